"""Load an export with stock transformers only (no vlmscale import) and answer one image question.

    python tests/hf_generate.py HF_DIR IMAGE.png "What colour is the circle?"

Uses AutoProcessor where the stock InternVL processor can be built (it needs torchvision for its
video processor); otherwise AutoTokenizer + AutoImageProcessor from the same directory, expanding
the image placeholder exactly as InternVLProcessor does.
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

hf_dir, image_path, question = sys.argv[1:4]
assert "vlmscale" not in sys.modules
model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
image = Image.open(image_path).convert("RGB")
if is_torchvision_available():
    processor = AutoProcessor.from_pretrained(hf_dir)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    tokenizer = processor.tokenizer
    how = "AutoProcessor"
else:
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    image_processor = AutoImageProcessor.from_pretrained(hf_dir)
    seq_len = json.loads((Path(hf_dir) / "processor_config.json").read_text())["image_seq_length"]
    pixels = image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
    n_tiles = int(pixels["num_patches"][0])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    block = tokenizer.start_image_token + tokenizer.context_image_token * (seq_len * n_tiles) + tokenizer.end_image_token
    prompt = prompt.replace(tokenizer.context_image_token, block)
    inputs = dict(tokenizer(prompt, return_tensors="pt", add_special_tokens=False))
    inputs["pixel_values"] = pixels["pixel_values"]
    how = "AutoTokenizer+AutoImageProcessor"
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"answer": answer, "loader": how, "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])}))
