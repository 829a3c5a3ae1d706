"""The refilling sampler (`sampler.generate(..., slots=S)`): a row that stops hands its decode slot
to the next waiting row. Against the sampler without slots on the same prompts (text-only rows and
rows with images, varied prompt lengths, end tokens at different steps): the same greedy tokens,
lengths and log-probs, the same sampled tokens (each row draws its token t from the same uniform),
for Qwen2.5-VL and Qwen3-VL (DeepStack), on one device and on meshes; decode work near the real
tokens (`Rollout.slot_steps`); one compile per bucket; bad slot counts refused.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from hf_reference import IMAGE, build_reference, make_batch
from vlm_jax import models, startup
from vlm_jax.config import ConfigError, GRPOConfig, MeshConfig
from vlm_jax.rl import rollout, sampler
from vlm_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
# Prompts: text-only, one image, two images, one image, text-only (different prompt lengths).
ROWS = [[], [(6, 10)], [(6, 10), (4, 4)], [(4, 4)], []]
PAD = 254
NEW = 12
G = 2


def family_ref(tmp_path_factory, family):
    path = tmp_path_factory.mktemp(f"refill_{family}")
    build_reference(path, seed=0, family=family)
    model, params = models.from_pretrained(path)
    patch = 16 if family == "qwen3_vl" else 14
    return SimpleNamespace(path=path, model=model, params=params,
                           batch=make_batch(ROWS, padding="left", seed=3, patch=patch))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return family_ref(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def ref_qwen3(tmp_path_factory):
    return family_ref(tmp_path_factory, "qwen3_vl")


def run(model, params, batch, *, eos=(), slots=0, new=NEW, num_samples=G, **kw) -> sampler.Rollout:
    kw = {"temperature": 0.0, "rng": jax.random.key(0), **kw}
    with jax.default_matmul_precision("highest"):
        return sampler.generate(model, params, batch, max_new_tokens=new, num_samples=num_samples,
                                eos_token_ids=eos, pad_token_id=PAD, slots=slots, **kw)


def spread_eos(free: sampler.Rollout) -> tuple[int, ...]:
    """End tokens that stop the greedy rows at different steps (each row's token at a step of its
    own, first occurrences only), leaving the last row's sample running to the cap."""
    eos: list[int] = []
    for n in range(0, len(free.lengths) - G, G):
        for k in range(1 + n // G, NEW):
            tok = int(free.tokens[n, k])
            if tok not in free.tokens[n, :k] and tok not in free.tokens[-1]:
                eos.append(tok)
                break
    return tuple(eos)


def assert_same(got: sampler.Rollout, want: sampler.Rollout, atol=1e-5):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.truncated, want.truncated)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol)


@pytest.fixture(scope="module")
def greedy_pair(ref):
    """(end tokens, the rollout without slots, with 3 slots) for 5 prompts x 2 samples; the slots'
    decode attention reads views of 4, 8 and 16 generated slots, the other the whole buffer."""
    eos = spread_eos(run(ref.model, ref.params, ref.batch))
    want = run(ref.model, ref.params, ref.batch, eos=eos)
    return eos, want, run(ref.model, ref.params, ref.batch, eos=eos, slots=3, min_kv_view=4)


def test_refill_greedy_equals_the_sampler(greedy_pair):
    eos, want, got = greedy_pair
    assert len(set(want.lengths.tolist())) >= 3, want.lengths  # rows stop at different steps
    assert want.truncated.any() and not want.truncated.all()
    assert_same(got, want)


def test_refill_decode_work_follows_the_lengths(ref, greedy_pair):
    """Without slots every row runs until the longest stops; with S slots the loop runs about
    sum(lengths - 1) / S iterations; with one slot exactly that sum (no idle slot-step)."""
    eos, want, got = greedy_pair
    N = len(want.lengths)
    decoded = int(want.lengths.sum()) - N  # the first token of each row comes from the prefill
    assert want.slot_steps == N * (want.lengths.max() - 1)
    assert decoded / got.slot_steps > decoded / want.slot_steps
    assert got.slot_steps % 3 == 0 and got.slot_steps // 3 <= -(-decoded // 3) + want.lengths.max()
    one = run(ref.model, ref.params, ref.batch, eos=eos, slots=1)
    assert_same(one, want)
    assert one.slot_steps == decoded
    # the TPU estimate's replay of both loops (`scripts/estimate_tpu.py`) iterates as they do
    spec = importlib.util.spec_from_file_location("estimate_tpu", ROOT / "scripts" / "estimate_tpu.py")
    est = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(est)
    assert N * len(est.decode_schedule(want.lengths)[0]) == want.slot_steps
    assert 3 * len(est.decode_schedule(want.lengths, 3)[0]) == got.slot_steps


def test_refill_sampling_draws_the_same_tokens(ref):
    """Row n's token t uses the same uniform with or without slots: the same sampled rollout (with
    top-k and end tokens, so rows stop at different steps)."""
    kw = dict(temperature=0.8, top_k=20, rng=jax.random.key(7), eos=(3, 9, 17, 40, 77, 101))
    want = run(ref.model, ref.params, ref.batch, **kw)
    got = run(ref.model, ref.params, ref.batch, slots=4, **kw)
    assert len(set(want.lengths.tolist())) >= 2
    assert_same(got, want)


def test_refill_on_meshes_equals_one_device(ref, greedy_pair):
    """A data-parallel mesh (a refilling loop per device, 2 slots each), a decoding layout (2, 1, 2)
    and a (2, 2, 2) mesh (one loop over the sharded slots and heads) give the single-device
    rollout, their decode attention reading bounded views of the sharded generated cache."""
    eos, want, _ = greedy_pair
    batch = make_batch(ROWS[:4], padding="left", seed=3)
    single = run(ref.model, ref.params, batch, eos=eos)
    for shape in ((2, 1, 1), (2, 1, 2), (2, 2, 2)):
        mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                         devices=jax.devices()[:int(np.prod(shape))])
        model, params = models.from_pretrained(ref.path, mesh=mesh)
        assert sampler.data_parallel(mesh, len(ROWS[:4])) == (shape == (2, 1, 1))
        got = run(model, params, batch, eos=eos, slots=4, min_kv_view=4)  # bounded reads, sharded
        assert_same(got, single)
        decoded = single.lengths.sum() - len(single.lengths)
        assert got.slot_steps >= decoded


def test_decode_reads_only_its_view_of_the_generated_cache(ref, greedy_pair):
    """Bounded KV reads: with views of 4, 8 and 16 generated slots (`min_kv_view=4`) a decode step
    reads the generated keys/values only up to the view that holds its furthest row. Generated
    slots past that view poisoned with NaN leave a step's logits finite and equal to a clean
    cache's, where a whole-buffer read turns them NaN; and a whole rollout is the same as with
    whole-buffer reads (refilled slots with views: `greedy_pair`, on meshes:
    `test_refill_on_meshes_equals_one_device`)."""
    from vlm_jax.models import lora

    assert sampler.decode_views(16, 4) == (4, 8, 16) and sampler.decode_views(16) == (16,)
    m = lora.bind(ref.model.graphdef, ref.params)
    inputs = sampler.prepare_prompts(ref.model, ref.batch, pad_id=PAD)
    x = m.embed(inputs.input_ids_BL, inputs.vision)
    logits, prompt_kv, key_valid, next_pos = sampler._prefill(m, x, inputs.positions_3BL, inputs.attention_mask_BL,
                                                              num_samples=1, mesh=None)
    clean = m.init_decode_cache(prompt_kv, key_valid, 1, 16)
    clean = clean._replace(k=tuple(k.at[..., :2].set(0.3) for k in clean.k),
                           v=tuple(v.at[:, :, :2].set(-0.2) for v in clean.v))  # tokens 0 and 1 generated
    nan = clean._replace(k=tuple(k.at[..., 4:].set(np.nan) for k in clean.k),
                         v=tuple(v.at[:, :, 4:].set(np.nan) for v in clean.v))
    tok, rope = logits.argmax(-1), m.decode_rope(next_pos + 2)

    def step(cache, views):
        with jax.default_matmul_precision("highest"):
            return np.asarray(m.decode_step(m.decode_weights(), tok, rope, cache, 2, 1, views)[0])

    whole = step(clean, ())
    np.testing.assert_allclose(step(nan, (4, 8, 16)), whole, atol=1e-5)
    assert np.isnan(step(nan, ())).all()
    rows = jax.numpy.asarray([2] * (len(tok) - 1) + [5])  # one slot per row, one row at slot 5: view 8
    assert np.isnan(np.asarray(m.decode_step(m.decode_weights(), tok, rope, nan, rows, 1, (4, 8, 16))[0])).all()

    eos, want, _ = greedy_pair
    assert_same(run(ref.model, ref.params, ref.batch, eos=eos, min_kv_view=4), want)


def test_qwen3_refill_greedy_equals_the_sampler(ref_qwen3):
    """Qwen3-VL: DeepStack features enter the prompts' prefill; decoding shares the layer body."""
    free = run(ref_qwen3.model, ref_qwen3.params, ref_qwen3.batch)
    eos = spread_eos(free)
    want = run(ref_qwen3.model, ref_qwen3.params, ref_qwen3.batch, eos=eos)
    assert len(set(want.lengths.tolist())) >= 3, want.lengths
    assert_same(run(ref_qwen3.model, ref_qwen3.params, ref_qwen3.batch, eos=eos, slots=3), want)


def test_refill_same_bucket_does_not_compile_again(ref):
    cache = sampler._generate._cache_size
    first = make_batch([[], [(4, 4)], [], [(4, 4)]], padding="right", seed=5)
    second = make_batch([[(6, 10)], [], [], []], padding="left", seed=6)  # same prompt / patch buckets

    def call(b, key, **kw):
        return run(ref.model, ref.params, b, slots=3, rng=jax.random.key(key), **kw)

    call(first, 0, new=9, temperature=0.7, top_p=0.9)
    n = cache()
    out = call(second, 1, new=15, temperature=1.3, top_p=0.5, top_k=4, eos=())
    assert cache() == n, "a refilling call in the same prompt/generation bucket compiled again"
    assert out.tokens.shape == (8, 15) and (out.lengths == 15).all()
    assert out.slot_steps == 3 * 3 * 14  # 8 rows of 14 decoded tokens each: 3 rounds over 3 slots


def test_grpo_rollout_with_refill_slots(ref, greedy_pair):
  """`grpo.refill_slots` reaches the sampler through the rollout (`SamplingSpec.for_grpo`): the same
  completions as the sampler with slots, and the decode slot utilisation as a rollout metric."""
  eos, _, want = greedy_pair
  cfg = GRPOConfig(num_samples=G, max_new_tokens=NEW, temperature=0.0, refill_slots=3)
  spec = rollout.SamplingSpec.for_grpo(cfg)
  tokens = rollout.SpecialTokens(eos, PAD, IMAGE)
  tokenizer = SimpleNamespace(batch_decode=lambda seqs, **_: [" ".join(map(str, s)) for s in seqs])
  reward_fn = lambda texts, answers, **_: (np.zeros(len(texts), np.float32), {})  # noqa: E731
  gen = functools.partial(rollout.generate_and_grade, ref.model, ref.params, spec=spec, tokens=tokens,
                          tokenizer=tokenizer, reward_fn=reward_fn)
  batch = {**ref.batch, "answer": [""] * len(ROWS)}
  with jax.default_matmul_precision("highest"):
    graded, metrics = rollout.sample_groups(gen, iter([batch]), rng=jax.random.key(0), cfg=cfg,
                                            batch_size=len(ROWS), image_id=IMAGE)
  assert spec.slots == 3
  assert_same(graded.rollout, want)
  decoded = want.lengths.sum() - len(want.lengths)
  assert metrics["rollout/decode_slot_util"] == pytest.approx(decoded / want.slot_steps)


def test_bad_slots_are_refused_before_compiling(ref):
  """`grpo.refill_slots` < 0 fails in the config; slots that do not split over the data axis of
  the mesh a stage samples on (its decoding mesh with `rollout_tensor`) fail at start-up, naming
  the key; `generate` refuses them too."""
  with pytest.raises(ConfigError, match="refill_slots"):
    GRPOConfig(refill_slots=-1)
  mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  stage = lambda slots, tensor=0: SimpleNamespace(  # noqa: E731
      objective="grpo", grpo=GRPOConfig(refill_slots=slots, rollout_tensor=tensor))
  startup.check_rollout_layouts(SimpleNamespace(stages=[stage(3), stage(8, 2)]), ref.model.config, mesh)
  cfg = SimpleNamespace(stages=[stage(3), stage(6, 2)])  # decoding mesh (data 4, tensor 2)
  with pytest.raises(ConfigError, match=r"stages.1.grpo.refill_slots: 6 decode slots do not split over "
                                        r"the mesh's data axis of 4"):
    startup.check_rollout_layouts(cfg, ref.model.config, mesh)
  with pytest.raises(ConfigError, match=">= 0"):
    run(ref.model, ref.params, ref.batch, slots=-2)
