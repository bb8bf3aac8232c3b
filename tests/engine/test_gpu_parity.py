"""bf16 parity on the GPU at a realistic shape: Triton kernels, fused layers, CUDA graphs."""

from __future__ import annotations

import random

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.engine import ipc
from radixlm.engine.core import EngineCore
from radixlm.request import LogprobOptions
from radixlm.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

NEW_TOKENS = 32


def engine_greedy(core: EngineCore, prompts: list[list[int]]):
    lp = LogprobOptions(return_logprob=True, top_logprobs_num=5)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = {f"p{i}": ([], []) for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        core.add_request(ipc.AddRequest(f"p{i}", ids, params, lp))
    while core.has_work():
        for out in core.step():
            outs[out.rid][0].extend(out.new_token_ids)
            outs[out.rid][1].extend({t for _, t in top} for top in out.output_top_logprobs)
    return [outs[f"p{i}"] for i in range(len(prompts))]


def test_bf16_greedy_agrees_with_transformers_or_stays_in_top5(tmp_path):
    from transformers import AutoModelForCausalLM

    from radixlm.bench.common import random_model_dir

    path = random_model_dir("llama3-1b", cache_dir=tmp_path, device="cuda")
    core = EngineCore(EngineConfig.from_kwargs(
        model=str(path), dtype="bfloat16", device="cuda", kv_cache_tokens=32768), progress=False)
    rng = random.Random(0)
    vocab = core.runner.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (17, 64, 200, 333)]
    ours = engine_greedy(core, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    agreed, diverged = 0, 0
    for ids, (tokens, tops) in zip(prompts, ours):
        gen = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
        ref = gen.sequences[0, len(ids):].tolist()
        for step, (mine, theirs) in enumerate(zip(tokens, ref)):
            if mine != theirs:  # first divergence: each side's pick is in the other's top-5
                ref_top5 = set(gen.logits[step][0].topk(5).indices.tolist())
                assert mine in ref_top5 and theirs in tops[step], (step, mine, theirs)
                diverged += 1
                break
            agreed += 1
    # Random weights give near-flat logits, so bf16 rounding flips near-ties early; what must
    # hold is the top-5 condition above at every first divergence.
    print(f"identical greedy tokens before divergence: {agreed}; prompts diverged: {diverged}")
    assert agreed + diverged >= len(prompts)
