"""The jitted sampler (`vlm_jax.rl.sampler`): greedy parity with transformers, stop semantics,
sampling statistics, determinism, `num_samples`, compile counting, sharding and input checks.

One tiny random reference checkpoint (vocab 256) is shared by every test; each distinct set of
static arguments of `sampler._generate` is one compile, so tests reuse rollouts through fixtures.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from hf_reference import build_reference, make_batch, reference_logits
from vlm_jax import models
from vlm_jax.config import MeshConfig
from vlm_jax.rl import sampler
from vlm_jax.sharding import make_mesh

# Prompts: text-only, one image (3x5 merged grid: partial vision windows), two images, one image.
ROWS = [[], [(6, 10)], [(6, 10), (4, 4)], [(4, 4)]]
PAD = 254          # a normal vocab id, distinct from 0, so "pad after the stop" is a real check
NEW = 12           # greedy tokens per row (gen bucket 16)
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  path = tmp_path_factory.mktemp("sampler_ref")
  torch_model = build_reference(path, seed=0)
  model, params = models.from_pretrained(path)
  return SimpleNamespace(path=path, torch=torch_model, model=model, params=params)


def greedy(model, params, batch, *, eos=(), new=NEW, num_samples=1) -> sampler.Rollout:
  with jax.default_matmul_precision("highest"):
    return sampler.generate(model, params, batch, max_new_tokens=new, temperature=0.0,
                            num_samples=num_samples, rng=jax.random.key(0), eos_token_ids=eos,
                            pad_token_id=PAD)


def continuation_batch(batch, rows, entries):
  """A right-padded processor batch of prompt + continuation, one row per (prompt index, tokens)
  entry, with each prompt's images; for teacher-forced logits of generated tokens."""
  valid = [np.asarray(batch["input_ids"][b])[np.asarray(batch["attention_mask"][b]).astype(bool)]
           for b in range(len(rows))]
  first_image = np.cumsum([0] + [len(r) for r in rows])
  grids = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3), np.int64)))
  first_patch = np.concatenate([[0], np.cumsum(np.prod(grids, -1))]).astype(int)
  seqs, out_grids, pixels = [], [], []
  for b, tokens in entries:
    seqs.append(np.concatenate([valid[b], np.asarray(tokens, np.int64)]))
    i, j = first_image[b], first_image[b + 1]
    out_grids.extend(grids[i:j])
    pixels.append(batch["pixel_values"][first_patch[i]:first_patch[j]] if j > i else None)
  L = max(map(len, seqs))
  ids = np.zeros((len(seqs), L), np.int64)
  mask = np.zeros((len(seqs), L), np.int64)
  for r, s in enumerate(seqs):
    ids[r, :len(s)], mask[r, :len(s)] = s, 1
  out = dict(input_ids=ids, attention_mask=mask)
  if out_grids:
    out["image_grid_thw"] = np.asarray(out_grids, np.int64)
    out["pixel_values"] = np.concatenate([p for p in pixels if p is not None])
  return out, [len(v) for v in valid]


def teacher_forced(logits_fn, batch, rows, rollout, num_samples=1):
  """Per rollout row, the logits [length, V] that predicted each generated token."""
  entries = [(n // num_samples, rollout.tokens[n, :rollout.lengths[n]])
             for n in range(len(rollout.lengths))]
  cont, prompt_lens = continuation_batch(batch, rows, entries)
  logits = np.asarray(logits_fn(cont), np.float64)
  return [logits[n, prompt_lens[b] - 1:prompt_lens[b] - 1 + rollout.lengths[n]]
          for n, (b, _) in enumerate(entries)]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def picked(logprobs_TV, tokens_T):
  return logprobs_TV[np.arange(len(tokens_T)), tokens_T]


def check_stop_semantics(rollout, eos, max_new):
  """lengths/truncated agree with the tokens; pad and zero logprob after the stop."""
  assert rollout.tokens.shape == rollout.logprobs.shape == (len(rollout.lengths), max_new)
  for n, length in enumerate(rollout.lengths):
    toks = rollout.tokens[n]
    first = [t for t in range(length) if toks[t] in eos]
    if rollout.truncated[n]:
      assert length == max_new and not first, n
    else:
      assert first == [length - 1], (n, toks, length)  # stops at, and includes, its first end token
    assert (toks[length:] == PAD).all(), n
    assert (rollout.logprobs[n, length:] == 0).all(), n
    assert (rollout.logprobs[n, :length] < 0).all(), n


# ---- greedy runs shared by several tests -------------------------------------------------------


@pytest.fixture(scope="module")
def batches():
  return {p: make_batch(ROWS, padding=p, seed=1) for p in ("right", "left")}


@pytest.fixture(scope="module")
def free_run(ref, batches):
  """Greedy, no end token: every row runs the full NEW tokens."""
  return greedy(ref.model, ref.params, batches["right"])


@pytest.fixture(scope="module")
def eos_choice(free_run):
  """(eos id, {row: first step}) for a token the free run emits at a step >= 1 in some rows but not
  in every row, so one batch has rows that stop and rows that are truncated."""
  for n in range(len(free_run.lengths)):
    for k in range(1, NEW):
      tok = int(free_run.tokens[n, k])
      rows = {m: int(np.argmax(free_run.tokens[m] == tok)) for m in range(len(free_run.lengths))
              if (free_run.tokens[m] == tok).any()}
      if rows[n] == k and len(rows) < len(free_run.lengths):
        return tok, rows
  raise AssertionError(f"no usable end token in the greedy outputs {free_run.tokens}")


@pytest.fixture(scope="module")
def eos_runs(ref, batches, eos_choice):
  return {p: greedy(ref.model, ref.params, b, eos=(eos_choice[0],)) for p, b in batches.items()}


def test_greedy_matches_transformers_teacher_forced(ref, batches, free_run, eos_runs, eos_choice):
  eos = (eos_choice[0],)
  right = eos_runs["right"]
  left = eos_runs["left"]
  # left- and right-padded input are the same prompts: the same rollout
  np.testing.assert_array_equal(left.tokens, right.tokens)
  np.testing.assert_array_equal(left.lengths, right.lengths)
  np.testing.assert_allclose(left.logprobs, right.logprobs, atol=1e-6)
  assert right.truncated.any() and not right.truncated.all()
  for run in (free_run, right):
    check_stop_semantics(run, eos if run is right else (), NEW)
  assert free_run.truncated.all() and (free_run.lengths == NEW).all()

  hf = lambda b: reference_logits(ref.torch, b)
  for name, run in (("free", free_run), ("eos", right)):
    for n, logits in enumerate(teacher_forced(hf, batches["right"], ROWS, run)):
      toks = run.tokens[n, :run.lengths[n]]
      np.testing.assert_array_equal(logits.argmax(-1), toks, err_msg=f"{name} row {n}")
      np.testing.assert_allclose(run.logprobs[n, :run.lengths[n]], picked(log_softmax(logits), toks),
                                 atol=LOGPROB_TOL, err_msg=f"{name} row {n}")


def test_eos_stops_row_at_its_first_end_token(free_run, eos_runs, eos_choice):
  tok, first_step = eos_choice
  run = eos_runs["right"]
  for n in range(len(run.lengths)):
    if n in first_step:
      k = first_step[n]
      assert run.lengths[n] == k + 1 and not run.truncated[n]
      np.testing.assert_array_equal(run.tokens[n, :k + 1], free_run.tokens[n, :k + 1])
      assert run.tokens[n, k] == tok
      assert (run.tokens[n, k + 1:] == PAD).all() and (run.logprobs[n, k + 1:] == 0).all()
      np.testing.assert_allclose(run.logprobs[n, :k + 1], free_run.logprobs[n, :k + 1], atol=1e-6)
    else:  # rows that never emit the end token are untouched by the others stopping
      assert run.lengths[n] == NEW and run.truncated[n]
      np.testing.assert_array_equal(run.tokens[n], free_run.tokens[n])


def test_all_rows_stop_on_first_token(ref, batches, free_run):
  eos = tuple(sorted(set(free_run.tokens[:, 0].tolist())))
  run = greedy(ref.model, ref.params, batches["right"], eos=eos, new=5)
  np.testing.assert_array_equal(run.lengths, np.ones(len(ROWS)))
  assert not run.truncated.any()
  np.testing.assert_array_equal(run.tokens[:, 0], free_run.tokens[:, 0])
  assert (run.tokens[:, 1:] == PAD).all() and (run.logprobs[:, 1:] == 0).all()


# ---- num_samples and sharding -------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_g2(ref, batches):
  return greedy(ref.model, ref.params, batches["right"], num_samples=2)


def test_num_samples_rows_are_consecutive(free_run, greedy_g2):
  G = 2
  assert greedy_g2.tokens.shape == (len(ROWS) * G, NEW)
  for n in range(len(ROWS) * G):  # row i*G + j is sample j of prompt i; greedy samples agree
    np.testing.assert_array_equal(greedy_g2.tokens[n], free_run.tokens[n // G])
    np.testing.assert_allclose(greedy_g2.logprobs[n], free_run.logprobs[n // G], atol=1e-6)
  # the prompts themselves differ, so a wrong row order would show
  assert len({tuple(t) for t in free_run.tokens}) == len(ROWS)


def test_sharded_greedy_equals_single_device(ref, batches, greedy_g2):
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  model, params = models.from_pretrained(ref.path, mesh=mesh)
  kernel = params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  assert len(kernel.sharding.device_set) == 8  # really spread over the mesh
  run = greedy(model, params, batches["right"], num_samples=2)
  np.testing.assert_array_equal(run.tokens, greedy_g2.tokens)
  np.testing.assert_array_equal(run.lengths, greedy_g2.lengths)
  np.testing.assert_allclose(run.logprobs, greedy_g2.logprobs, atol=1e-5)


@pytest.mark.parametrize("data", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_data_parallel_sampling_equals_single_device(ref, batches, data):
  """On a mesh that only splits the batch, each device runs its own decode loop (shard_map, no
  per-token all-reduce); greedy and sampled rows, end tokens included, match one device."""
  mesh = make_mesh(MeshConfig(data=data, fsdp=1, tensor=1), devices=jax.devices()[:data])
  model, params = models.from_pretrained(ref.path, mesh=mesh)
  assert sampler.data_parallel(mesh, len(ROWS))
  for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=20)):
    kw.update(max_new_tokens=NEW, num_samples=2, rng=jax.random.key(3), pad_token_id=PAD,
              eos_token_ids=(7, 11, 13))
    with jax.default_matmul_precision("highest"):
      want = sampler.generate(ref.model, ref.params, batches["left"], **kw)
      got = sampler.generate(model, params, batches["left"], **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.truncated, want.truncated)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  assert not sampler.data_parallel(mesh, len(ROWS) + 1)  # prompts that do not split: one loop


# ---- sampling ----------------------------------------------------------------------------------


def sample(model, params, batch, key, **kw):
  with jax.default_matmul_precision("highest"):
    return sampler.generate(model, params, batch, rng=key, eos_token_ids=(), pad_token_id=PAD, **kw)


def test_sampling_is_a_function_of_the_key(ref, batches):
  kw = dict(max_new_tokens=8, temperature=0.7, num_samples=2)
  a = sample(ref.model, ref.params, batches["right"], jax.random.key(1), **kw)
  b = sample(ref.model, ref.params, batches["right"], jax.random.key(1), **kw)
  c = sample(ref.model, ref.params, batches["right"], jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).mean() > 0.5  # vocab 256 at entropy ~4 nats: nearly all differ
  for g in range(0, len(a.lengths), 2):  # the two samples of one prompt are different draws
    assert (a.tokens[g] != a.tokens[g + 1]).any()
  # logprobs are of the temperature-1 policy, whatever the sampling temperature
  with jax.default_matmul_precision("highest"):
    fwd = lambda cont: models.forward(ref.model, ref.params, cont)
    for n, logits in enumerate(teacher_forced(fwd, batches["right"], ROWS, a, num_samples=2)):
      np.testing.assert_allclose(a.logprobs[n], picked(log_softmax(logits), a.tokens[n]),
                                 atol=LOGPROB_TOL, err_msg=f"row {n}")


STAT_SAMPLES = 8000
STAT_TEMPERATURE = 0.7
# Total variation distance of 8000 draws from these distributions: median 0.006-0.021, 99.9th
# percentile <= 0.032 (simulated with numpy); a wrong temperature moves it by > 2 * TV_TOL.
TV_TOL = 0.04


def truncated_dist(logits_V, temperature, top_k=0, top_p=1.0):
  """Reference next-token distribution, transformers' order: temperature, then top-k, then top-p."""
  scaled = np.asarray(logits_V, np.float64) / temperature
  p = np.exp(log_softmax(scaled))
  if top_k:
    p = np.where(scaled >= np.sort(scaled)[-top_k], p, 0.0)
    p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p)
    above = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
    keep = np.zeros_like(p, bool)
    keep[order[above < top_p]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


@pytest.fixture(scope="module")
def peaked(ref):
  """The reference model with its lm_head scaled x2: a few tokens share most of the next-token mass
  of the prompt (entropy at T=0.7 ~2 nats), so truncation and temperature both matter."""
  def scale(path, x):
    return x * 2.0 if "lm_head" in jax.tree_util.keystr(path) else x
  params = jax.tree_util.tree_map_with_path(scale, ref.params)
  batch = make_batch([[]], seed=1)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(models.forward(ref.model, params, batch), np.float64)[0, -1]
  return params, batch, logits


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_first_token_frequencies_match_softmax(ref, peaked, top_k, top_p):
  params, batch, logits = peaked
  want = truncated_dist(logits, STAT_TEMPERATURE, top_k, top_p)
  full = truncated_dist(logits, STAT_TEMPERATURE)
  assert -(full * np.log(full)).sum() > 1.0  # an interesting distribution
  assert 0.5 * np.abs(want - truncated_dist(logits, 1.0, top_k, top_p)).sum() > 2 * TV_TOL
  if top_p < 1.0:  # the nucleus at T=1 (a common bug) would be larger than at T=0.7
    assert (truncated_dist(logits, 1.0, 0, top_p) > 0).sum() > (want > 0).sum() > 1
  run = sample(ref.model, params, batch, jax.random.key(42), max_new_tokens=1,
               temperature=STAT_TEMPERATURE, top_k=top_k, top_p=top_p,
               num_samples=STAT_SAMPLES)
  first = run.tokens[:, 0]
  assert (run.lengths == 1).all() and run.truncated.all()
  outside = sorted(set(first[want[first] == 0].tolist()))
  assert not outside, f"sampled tokens outside the allowed set: {outside}"
  freq = np.bincount(first, minlength=len(want)) / STAT_SAMPLES
  tv = 0.5 * np.abs(freq - want).sum()
  assert tv < TV_TOL, (tv, np.argsort(-want)[:6], want[np.argsort(-want)[:6]])
  # logprobs: the temperature-1 policy, without truncation
  np.testing.assert_allclose(run.logprobs[:, 0], log_softmax(logits)[first], atol=LOGPROB_TOL)


# ---- compilation -------------------------------------------------------------------------------


def _longer(batch, extra: int, seed: int):
  """The same batch with `extra` random text tokens prepended to every row (right-padded input)."""
  rng = np.random.default_rng(seed)
  B = batch["input_ids"].shape[0]
  prefix = rng.integers(0, 200, size=(B, extra))
  return {**batch, "input_ids": np.concatenate([prefix, batch["input_ids"]], 1),
          "attention_mask": np.concatenate([np.ones_like(prefix), batch["attention_mask"]], 1)}


def test_same_bucket_does_not_compile_again(ref):
  cache = sampler._generate._cache_size
  first = make_batch([[], [(4, 4)]], padding="right", seed=5)    # 16 patches
  second = make_batch([[], [(6, 10)]], padding="left", seed=6)   # 60 patches: same patch bucket
  lengths = lambda b: sorted(b["attention_mask"].sum(-1).tolist())
  assert lengths(first) != lengths(second) and max(lengths(second)) <= 32
  run = lambda b, key, **kw: sampler.generate(ref.model, ref.params, b, rng=jax.random.key(key),
                                              eos_token_ids=(), **kw)

  run(first, 0, max_new_tokens=9, temperature=0.7, top_p=0.9)
  n = cache()
  out = run(second, 1, max_new_tokens=15, temperature=1.3, top_p=0.5, top_k=4)
  assert cache() == n, "a call in the same prompt/generation bucket compiled again"
  assert out.tokens.shape == (2, 15) and (out.lengths == 15).all()

  longer = _longer(second, 20, seed=7)
  assert max(lengths(longer)) > 32
  run(longer, 2, max_new_tokens=9, temperature=0.7, top_p=0.9)
  assert cache() == n + 1, "a longer prompt bucket must compile once"
  out = run(first, 3, max_new_tokens=17, temperature=0.7, top_p=0.9)
  assert cache() == n + 2, "a larger generation bucket must compile once"
  assert out.tokens.shape == (2, 17)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(num_samples=0), "num_samples"),
])
def test_bad_sampling_parameters_raise(ref, kw, match):
  batch = make_batch([[]], seed=0)
  args = dict(max_new_tokens=4, temperature=1.0, rng=jax.random.key(0), eos_token_ids=())
  with pytest.raises(ValueError, match=match):
    sampler.generate(ref.model, ref.params, batch, **{**args, **kw})


def test_missing_eos_ids_raise(ref):
  # the reference checkpoint has no eos_token_id in generation_config.json / config.json
  with pytest.raises(ValueError, match="eos_token_ids"):
    sampler.generate(ref.model, ref.params, make_batch([[]], seed=0), max_new_tokens=4,
                     rng=jax.random.key(0))


# ---- Qwen3-VL through the same sampler -------------------------------------------------------


@pytest.fixture(scope="module")
def ref_qwen3(tmp_path_factory):
  path = tmp_path_factory.mktemp("sampler_ref_qwen3")
  torch_model = build_reference(path, seed=0, family="qwen3_vl")
  model, params = models.from_pretrained(path)
  return SimpleNamespace(path=path, torch=torch_model, model=model, params=params)


def test_qwen3_greedy_matches_transformers_and_sharded_run(ref_qwen3):
  """Qwen3-VL (DeepStack features in the prompt, interleaved MRoPE): greedy tokens are
  transformers' argmax of the teacher-forced logits, the sampler's log-probs the teacher-forced
  ones, G = 2 samples share a prompt; a (2, 2, 2) mesh and a data-parallel (4, 1, 1) mesh (a
  decode loop per device) give the same rollout."""
  batch = make_batch(ROWS, padding="left", seed=2, patch=16)
  run = greedy(ref_qwen3.model, ref_qwen3.params, batch, num_samples=2, eos=(7, 11, 13))
  assert run.tokens.shape == (len(ROWS) * 2, NEW)
  hf = lambda b: reference_logits(ref_qwen3.torch, b)
  for n, logits in enumerate(teacher_forced(hf, batch, ROWS, run, num_samples=2)):
    toks = run.tokens[n, :run.lengths[n]]
    np.testing.assert_array_equal(logits.argmax(-1), toks, err_msg=f"row {n}")
    np.testing.assert_allclose(run.logprobs[n, :run.lengths[n]], picked(log_softmax(logits), toks),
                               atol=LOGPROB_TOL, err_msg=f"row {n}")
  assert len({tuple(t) for t in run.tokens[::2]}) == len(ROWS)

  for shape in ((2, 2, 2), (4, 1, 1)):  # one loop over the sharded batch; one loop per device
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                     devices=jax.devices()[:int(np.prod(shape))])
    model, params = models.from_pretrained(ref_qwen3.path, mesh=mesh)
    assert sampler.data_parallel(mesh, len(ROWS)) == (shape == (4, 1, 1))
    sharded = greedy(model, params, batch, num_samples=2, eos=(7, 11, 13))
    np.testing.assert_array_equal(sharded.tokens, run.tokens)
    np.testing.assert_allclose(sharded.logprobs, run.logprobs, atol=1e-5)
