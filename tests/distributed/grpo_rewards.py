"""A user reward for the GRPO tests (``grpo.rewards={"tests.distributed.grpo_rewards:short": ...}``): the
tiny random model never answers a demo question right, so exact match alone gives no group variance."""


def short(record: dict, completion: str) -> float:
    """Shorter completions score higher: a signal any model can follow."""
    return -float(len(completion))
