"""Sampling (`skymoe sample`, `skymoe_jax.sample`): greedy decoding with the KV cache gives the argmax of the
full forward pass recomputed at every position; the cache's logits are the uncached ones; temperature, top-p
and the seed do what they say; a pipelined, expert-parallel checkpoint samples on one device; an imported
Mixtral decodes as transformers' own greedy generation; bad input is one line."""

import inspect
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import own_stderr
from faults import train_tokenizer
from flax import nnx

import skymoe_jax
from skymoe_jax import load_model
from skymoe_jax.checkpoint.manager import Checkpointer
from skymoe_jax.cli import main
from skymoe_jax.config import DEFAULT_CONFIG, load_config
from skymoe_jax.data.tokenizers import ByteTokenizer, make_tokenizer
from skymoe_jax.model.decode import decoding_model, empty_cache, forward_cached, generate, next_token
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.training import runtime as runtime_lib

SEQ_LEN = 32
# A checkpoint stored the hardest way for sampling: an uneven 2-stage pipeline (a padded slot in the stored
# stack), experts split over 4 devices. Dropless, so that its own forward pass (on the 8 devices it was written
# on) routes as decoding does and is an independent reference. Written at initialization, as a run's first
# checkpoint: a few training steps would cost 10 s more and leave the weights as random.
RUN = [
    "--config.model.d_model=32",
    "--config.model.num_layers=3",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
    "--config.moe.num_experts=4",
    "--config.moe.expert_ffn_dim=32",
    "--config.moe.group_size=0",
    "--config.moe.dropless=True",
    "--config.model.init_std=0.2",  # logits far enough apart for a greedy choice to mean something
    f"--config.data.seq_len={SEQ_LEN}",
    "--config.data.batch_size=8",
    "--config.parallel.mesh=(2,1,4)",
    "--config.parallel.pipeline_stage_layers=(1,2)",
]
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample") / "run"
    config = load_config(DEFAULT_CONFIG, RUN)
    checkpoints = Checkpointer(str(workdir), create=True)
    checkpoints.save(0, runtime_lib.build(config).init(), config)
    checkpoints.close()
    return workdir


@pytest.fixture(scope="module")
def on_mesh(run):
    """The model on the mesh it was written on, stored as a pipeline."""
    return load_model(str(run))[0]


@pytest.fixture(scope="module")
def model(run):
    """The model on one device, as sampling runs it."""
    return decoding_model(load_model(str(run), device=jax.local_devices()[0])[0])


# One length for every generation and full forward pass here, so that each is compiled once.
STEPS = SEQ_LEN + 1 - len(PROMPT)  # new tokens: the model reads the prompt and all but the last
logits_of = jax.jit(lambda model, tokens: model(tokens).logits)


def _greedy_reference(model, prompt: list[int]) -> list[int]:
    """Greedy continuation by the full forward pass over the whole sequence so far, at every position: in a
    fixed-length buffer, one compile (the model is causal: the zeros after the sequence change nothing before)."""
    seq = list(prompt)
    for _ in range(STEPS):
        buffer = np.zeros((1, SEQ_LEN), np.int32)
        buffer[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(logits_of(model, jnp.asarray(buffer))[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_sample_is_the_argmax_of_the_full_forward_at_every_position(run, on_mesh, model, capsys):
    prompt = list(PROMPT.encode())
    want = _greedy_reference(on_mesh, prompt)
    assert generate(model, jnp.asarray(prompt), STEPS, key=jax.random.key(0), temperature=0).tolist() == want
    # The same through skymoe_jax.sample and the command, which print its text.
    text = ByteTokenizer().decode(prompt + want)[len(PROMPT) :]
    assert skymoe_jax.sample(run, PROMPT, max_tokens=STEPS, temperature=0) == text
    assert main(["sample", f"--workdir={run}", f"--prompt={PROMPT}", f"--max_tokens={STEPS}", "--temperature=0"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_greedy_decoding_of_the_default_model_is_its_full_forward_argmax():
    """The default config's model (4 layers, 8 experts top-2, gate normalization, 256-token context), decoded as
    `skymoe sample` decodes it. Its only change: weights drawn 10x wider than the default init, so that greedy
    choices are not near-ties that summation order could flip."""
    config = load_config(DEFAULT_CONFIG, ["--config.model.init_std=0.2"])
    model = decoding_model(skymoe_jax.build_model(ModelSpec.from_config(config), seed=0))
    prompt, steps = list(b"import os\nimport sys\n"), 16
    new = generate(model, jnp.asarray(prompt), steps, key=jax.random.key(0), temperature=0).tolist()
    # The model is causal: one forward pass over the whole sequence gives the logits at every prefix's end.
    logits = jax.jit(lambda m, t: m(t).logits)(model, jnp.asarray([prompt + new[:-1]], jnp.int32))[0]
    assert np.argmax(np.asarray(logits[len(prompt) - 1 :]), axis=-1).tolist() == new


def test_one_device_model_computes_the_pipelined_expert_parallel_one(on_mesh, model):
    """The checkpoint restored onto one device and unpadded (decoding_model) gives the run's own logits."""
    assert on_mesh.mesh_layout.pipelined and not model.mesh_layout.pipelined
    assert {len(a.sharding.device_set) for a in jax.tree.leaves(nnx.state(model))} == {1}
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, SEQ_LEN)), jnp.int32)
    # float32, summed in other orders over 8 devices: measured 3.3e-6 at logits up to 4.4.
    got, want = (np.asarray(logits_of(m, tokens)) for m in (model, on_mesh))
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_cached_logits_are_the_uncached_ones(model):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, SEQ_LEN)), jnp.int32)
    want = logits_of(model, tokens)
    step = jax.jit(forward_cached)
    # A prefill of 11 tokens, then one token a step, each reading the cache the steps before wrote.
    logits, cache = step(model, tokens[:, :11], jnp.int32(0), empty_cache(model, 1, SEQ_LEN))
    got = [logits]
    for i in range(11, SEQ_LEN):
        logits, cache = step(model, tokens[:, i : i + 1], jnp.int32(i), cache)
        got.append(logits)
    # float32; the two differ in summation orders: the attention (XLA's over the cache, the CPU kernel's in the
    # forward pass) and the matmuls of other shapes. Measured 3.4e-6 at logits up to 4.4.
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=5e-5, rtol=0)


def test_temperature_top_p_and_seed(model):
    greedy = skymoe_jax.sample(model, PROMPT, max_tokens=STEPS, temperature=0)
    # The nucleus of a tiny top_p is the most likely token alone, whatever the temperature.
    assert skymoe_jax.sample(model, PROMPT, max_tokens=STEPS, temperature=5.0, top_p=1e-6, seed=3) == greedy
    drawn = [skymoe_jax.sample(model, PROMPT, max_tokens=STEPS, seed=seed) for seed in (0, 0, 1)]
    assert drawn[0] == drawn[1] != drawn[2]


def test_draws_follow_the_temperature_and_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(next_token, in_axes=(None, 0, None, None, None)))

    def shares(temperature, top_p):
        tokens = draw(jnp.log(jnp.asarray(probs, jnp.float32)), keys, temperature, top_p, 4)
        return np.bincount(np.asarray(tokens), minlength=4) / len(keys)

    # top_p 0.7: the two most likely tokens (0.5 < 0.7 <= 0.8), their probabilities renormalized; 0.03 is 4 standard
    # deviations of a share of 4,000 draws.
    np.testing.assert_allclose(shares(1.0, 0.7), [5 / 8, 3 / 8, 0, 0], atol=0.03)
    # Temperature 1/2 squares the probabilities (renormalized).
    np.testing.assert_allclose(shares(0.5, 1.0), probs**2 / np.sum(probs**2), atol=0.03)


def test_generation_stops_at_the_end_of_text_token(model):
    prompt, key = jnp.asarray(list(PROMPT.encode()), jnp.int32), jax.random.key(0)
    free = generate(model, prompt, STEPS, key=key).tolist()
    assert len(free) == STEPS
    stop = free[3]
    assert generate(model, prompt, STEPS, key=key, stop=stop).tolist() == free[: free.index(stop) + 1]
    # Ids at or past the tokenizer's vocabulary are never drawn.
    assert max(generate(model, prompt, STEPS, key=key, vocab=7).tolist()) < 7


def test_a_hugging_face_tokenizer_samples_within_its_vocabulary(run, model, tmp_path):
    path = train_tokenizer(tmp_path / "tokenizer.json", ["a b c"] * 4)
    tok = make_tokenizer(path)
    prompt = " ".join("abcabcabcabcab")  # 14 tokens, as PROMPT has: the program compiled above serves
    ids = tok.encode(prompt)
    assert len(ids) == len(PROMPT)
    new = generate(model, jnp.asarray(ids), STEPS, key=jax.random.key(0), temperature=0, vocab=tok.vocab_size)
    assert max(new.tolist()) < tok.vocab_size
    want = tok.decode([*ids, *new.tolist()])[len(tok.decode(ids)) :]
    assert skymoe_jax.sample(run, prompt, max_tokens=STEPS, temperature=0, tokenizer=path) == want


def test_hugging_face_tokenizer_end_of_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c"] * 4, trainers.BpeTrainer(vocab_size=30, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert make_tokenizer(str(tmp_path / "tokenizer.json")).end_of_text == tok.token_to_id("</s>")
    # Where the model's tokenizer_config.json names it, that one.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[UNK]"}}))
    assert make_tokenizer(str(tmp_path / "tokenizer.json")).end_of_text == tok.token_to_id("[UNK]")


@pytest.mark.long
def test_imported_mixtral_decodes_as_transformers_generate(tmp_path, capsys):
    """Against another implementation's greedy decoding with its own cache; the long profile, since the greedy
    case above checks decoding in the default run and this one takes 9 s."""
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[hf]'")
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    from test_hf_import import _hf_model

    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    model = decoding_model(load_model(str(tmp_path / "run"), device=jax.local_devices()[0])[0])
    prompt = [5, 17, 42, 3]
    hf.generation_config.eos_token_id = None  # twelve tokens, whatever they are
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    got = generate(model, jnp.asarray(prompt), 12, key=jax.random.key(0), temperature=0)
    assert got.tolist() == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--prompt=x"], "skymoe sample needs --workdir"),
        (["--workdir={empty}/nowhere", "--prompt=x"], "no such directory"),
        (["--workdir={empty}", "--prompt=x"], "no checkpoint in"),
        (["--workdir={run}"], "the prompt is empty"),
        (["--workdir={run}", "--prompt=" + "x" * (SEQ_LEN + 1)], "give a shorter prompt"),
        (["--workdir={run}", "--prompt=abc", "--max_tokens=100"], f"ask for at most {SEQ_LEN - 2} new tokens"),
        (["--workdir={run}", "--prompt=abc", "--max_tokens=0"], "max_tokens=0 must be a positive integer"),
        (["--workdir={run}", "--prompt=abc", "--temperature=-1"], "temperature=-1.0 must be a number >= 0"),
        (["--workdir={run}", "--prompt=abc", "--top_p=0"], "top_p=0.0 must be in (0, 1]"),
        (["--workdir={run}", "--prompt=abc", "--top_p=x"], "--top_p='x' must be a number"),
        (["--workdir={run}", "--prompt=ab\udcffc"], "which is not UTF-8 text"),
        (["--workdir={run}", "--prompt=a ¤ b", "--tokenizer={tokenizer}"], "has no token for (it became [UNK])"),
        (["--workdir={run}", "--prompt=x", "--tokenizer={empty}/none.json"], "tokenizer='"),
        (["--workdir={run}", "--prompt=x", "--tokenizer={big}"], "tokens but the model only 256"),
    ],
)
def test_bad_input_is_one_line(flags, needle, run, tmp_path, capsys):
    tokenizer = train_tokenizer(tmp_path / "tokenizer.json", ["a b c"] * 4)
    big = train_tokenizer(tmp_path / "big.json", [inspect.getsource(json)], vocab_size=400)
    flags = [f.format(run=run, empty=tmp_path, tokenizer=tokenizer, big=big) for f in flags]
    assert main(["sample", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_the_command_prints_one_line_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "skymoe_jax.cli", "sample", f"--workdir={tmp_path}", "--prompt=x"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    err = own_stderr(result.stderr)
    assert result.returncode == 2 and result.stdout == ""
    assert err.strip() == f"skymoe sample: error: no checkpoint in {tmp_path}/checkpoints; train first with " + (
        f"`skymoe train --workdir={tmp_path}`"
    )
