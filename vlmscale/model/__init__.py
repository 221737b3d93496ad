"""InternVL model building, parameter policy and the training forward."""
