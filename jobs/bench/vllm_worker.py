"""vLLM's side of jobs.bench.generate: run by the Python of vLLM's environment (`make vllm-env`) as

    .venv-vllm/bin/python -m jobs.bench.vllm_worker MODEL_DIR THREADS DTYPE

it loads MODEL_DIR (the benchmark's random-weight GPT-2, saved by the parent) into `vllm.LLM`, says
{"ready": ...} on stdout, then answers one JSON line per request line on stdin:
{"prompts": [[ids]], "n", "max_new_tokens", "seed"} -> {"seconds", "rows", "lengths"}. Every row draws
exactly max_new_tokens tokens from softmax(logits) (no EOS stop, no top-k), as the parent's methods do.
Only vLLM, torch and the standard library are imported here.
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    model_dir, threads, dtype = argv[0], int(argv[1]), argv[2]
    global ANSWERS
    # Answers go to the original stdout; everything vLLM prints (its logger writes to stdout) to stderr.
    ANSWERS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one timed process
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    # Whole prefills (no chunking): a split one has its seeded generator rewound, which a CPU
    # generator cannot do (vLLM 0.32).
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=not cuda, skip_tokenizer_init=True, seed=0,
              enable_prefix_caching=True, enable_chunked_prefill=False)
    reply({"ready": True, "load_seconds": time.perf_counter() - start, "vllm": __import__("vllm").__version__})
    for line in sys.stdin:
        req = json.loads(line)
        params = SamplingParams(n=req["n"], temperature=1.0, top_p=1.0, max_tokens=req["max_new_tokens"],
                                min_tokens=req["max_new_tokens"], ignore_eos=True, detokenize=False, seed=req["seed"])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        reply({"seconds": seconds, "rows": len(lengths), "lengths": sorted(set(lengths))})


ANSWERS = sys.stdout


def reply(obj: dict) -> None:
    ANSWERS.write(json.dumps(obj) + "\n")
    ANSWERS.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
