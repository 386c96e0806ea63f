"""Run by tests/llama_cpp_build.py in a subprocess with llama_cpp on PYTHONPATH: one GGUF, one request.

Reads a JSON request on stdin and prints one JSON line: what llama.cpp itself makes of the model.
  gguf:      the file
  tokenize:  texts -> ids without BOS, `special=False` (a marker in plain text must be its token
             without special-token parsing, as in a user's prompt)
  greedy:    {"prompts": [ids], "n": N} -> N argmax tokens after each prompt (no sampler, no penalty)
  argmax:    [ids] -> the argmax after every position of each sequence (teacher-forced)
  grammar:   {"file", "prompt", "max_tokens", "temperature", "seed"} -> the text generated under the GBNF
It imports nothing from peftko or the tests: only llama_cpp and numpy.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import numpy as np
    from llama_cpp import Llama, LlamaGrammar

    req = json.loads(sys.stdin.read())
    longest = max([len(s) for s in req.get("argmax", [])]
                  + [len(p) + req["greedy"]["n"] for p in req.get("greedy", {}).get("prompts", [])] + [0])
    n_ctx = max(512, longest + 8, req.get("grammar", {}).get("max_tokens", 0) + 64)
    # logits_all: the teacher-forced argmax needs every position's logits
    llm = Llama(model_path=req["gguf"], n_ctx=n_ctx, n_batch=256, n_threads=2, logits_all=True,
                seed=req.get("grammar", {}).get("seed", 0), verbose=False)
    out: dict = {"n_vocab": llm.n_vocab()}
    if "tokenize" in req:
        out["tokenize"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in req["tokenize"]]
    if "greedy" in req:
        out["greedy"] = []
        for prompt in req["greedy"]["prompts"]:
            llm.reset()
            llm.eval(prompt)
            got = []
            for _ in range(req["greedy"]["n"]):
                got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([got[-1]])
            out["greedy"].append(got)
    if "argmax" in req:
        out["argmax"] = []
        for ids in req["argmax"]:
            llm.reset()
            llm.eval(ids)
            out["argmax"].append([int(i) for i in np.argmax(llm.scores[: len(ids)], axis=1)])
    if "grammar" in req:
        g = req["grammar"]
        llm.reset()
        grammar = LlamaGrammar.from_file(g["file"], verbose=False)
        done = llm.create_completion(g["prompt"], grammar=grammar, max_tokens=g["max_tokens"],
                                     temperature=g["temperature"], top_k=g.get("top_k", 40), top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0, seed=g["seed"])
        choice = done["choices"][0]
        out["grammar"] = {"text": choice["text"], "finish_reason": choice["finish_reason"],
                          "tokens": done["usage"]["completion_tokens"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
