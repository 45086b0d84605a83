"""SmolLM2-135M through the serving engine: greedy text equals metafit.models.generate (start-up check of configs/serve/smollm2_tasks.yaml).

    PYTHONPATH=. python benchmarks/serve_smollm2_greedy.py      # ~5 min on a loaded 2-core CPU
"""
import dataclasses, time, json
import numpy as np
t0 = time.time()
from metafit.serve.config import load_serve_config
from metafit.serve.server import build_state
from metafit.serve.engine import Request
import metafit.models as mm
config = load_serve_config("configs/serve/smollm2_tasks.yaml")
config = dataclasses.replace(config, warm_up=False, prompt_buckets=(32,), new_token_buckets=(12,), batch_size=2)
warnings = []
state = build_state(config, warn=warnings.append)
print("built", round(time.time() - t0, 1), "s;", len(warnings), "adapters skipped; first warning:", warnings[0], flush=True)
tok = state.tokenizer
prompts = ["The capital of France is", "1, 2, 3, 4,"]
ids = [tok(p)["input_ids"] for p in prompts]
texts = {}
reqs = []
for i, p in enumerate(ids):
    texts[i] = []
    reqs.append(Request(p, 12, emit=lambda k, v, i=i: texts[i].append(v) if k == "text" else None))
state.engine.run_batch(reqs)
served = ["".join(texts[i]) for i in range(2)]
model, _ = mm.load("smollm2-135m-instruct")
want = []
for p in ids:
    out = np.asarray(mm.generate(model, np.asarray(p), max_new_tokens=12))[len(p):]
    stops = set(model.config.eos_token_ids)
    cut = next((k for k, t in enumerate(out) if int(t) in stops), len(out))
    want.append(tok.decode(out[:cut], skip_special_tokens=True))
print(json.dumps({"served": served, "generate": want, "equal": served == want, "seconds": round(time.time() - t0, 1)}))
