"""Random-initialized models with real published shapes, for scale benchmarks only.

    python tests/benchmarks/make_models.py llama-3.2-1b /work/tmp/models/llama-3.2-1b
    python tests/benchmarks/make_models.py {tiny,tiny-qwen2,llama-3.2-1b,llama-3.2-3b,qwen2.5-3b} OUT_DIR [--seed N]

writes a Hugging Face model directory with nothing downloaded:

- config.json: the published architecture hyperparameters (SHAPES below, each with its source), dtype bfloat16;
  bos/eos/pad ids are the tokenizer's (below), not the published ones;
- generation_config.json, derived from the config;
- tokenizer.json + tokenizer_config.json: the tiny-llama fixture's byte-level BPE vocab and merges (1024 tokens;
  <|bos|>=0, <|eos|>=1, <|pad|>=2, BOS prepended) with the family's own pre-tokenizer (Llama 3 split regex, or
  Qwen2's with NFC: llama.cpp "llama-bpe" / "qwen2"), its BPE vocab padded with unreachable filler entries
  `<|filler_N|>` up to the published vocab size, so `len(tokenizer) == vocab_size` and the GGUF token list has
  one token per embedding row. Only the first 1024 ids are ever produced (2.6 characters per token on the
  Python-docs eval slice, 1.9 on the PSF license prose). The fillers are ordinary vocab entries, not added
  tokens, so loading stays fast (128256 tokens: 0.12 s);
- bf16 weights as sharded safetensors (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`,
  shards of at most --max-shard-size, 2 GB by default, filled in order like `save_pretrained`).
  Initialization as transformers does it: Linear/Embedding weights ~ N(0, initializer_range), biases 0,
  norm weights 1. Every tensor has its own generator seeded from (seed, tensor name), so the bytes depend only
  on the seed and the shape, never on the order or the sharding.

Tensor names and shapes come from the transformers model built on the meta device (no memory). The shards are
written by a streaming safetensors writer: header first (offsets are known from the shapes), then one tensor
at a time, so peak memory is about one tensor (the embedding, ~0.5-0.6 GB for the published shapes) plus the
interpreter. The directory is assembled under a temporary name and renamed when complete.

Afterwards the result is checked: AutoConfig and AutoTokenizer load it, len(tokenizer) == vocab_size, the
index covers every parameter with the right shape and dtype in the shard it names; for the tiny shapes also
AutoModelForCausalLM.from_pretrained + a forward pass.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama"
if str(ROOT) not in sys.path:  # birdbone_core (the GGUF exporter's pre-tokenizer regexes) from any cwd
    sys.path.insert(0, str(ROOT))

# Published config.json values (architecture only; token ids are replaced by the tokenizer's).
_LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# what the Llama 3.2 sizes share (each adds its width, depth and heads)
_LLAMA32 = dict(architectures=["LlamaForCausalLM"], model_type="llama", intermediate_size=8192, hidden_act="silu",
                vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, attention_bias=False, mlp_bias=False,
                initializer_range=0.02, pretraining_tp=1)
SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B config.json, as quoted in github.com/kevinstephano/thunder_model_blocks
    # hf_llama/llama_config.py (Llama-3.2-1B-Instruct, hub commit 4e20de36...) and
    # github.com/Anthony-Lionetti/PyTorch-nn-Tinkering llama_play/configs.py. Published size 1.24B (1,235,814,400).
    "llama-3.2-1b": dict(
        _LLAMA32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64),
    # meta-llama/Llama-3.2-3B config.json, as quoted in github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md.
    # Published size 3.21B (3,212,749,824).
    "llama-3.2-3b": dict(
        _LLAMA32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128),
    # Qwen/Qwen2.5-3B config.json, as mirrored at huggingface.co/unsloth/Qwen2.5-3B/blob/main/config.json
    # (`_name_or_path: Qwen/Qwen2.5-3B`); the Qwen2.5-3B-Instruct model card: 3.09B parameters, 36 layers,
    # 16 Q / 2 KV heads, QKV bias, tied word embeddings. Qwen2 always has q/k/v biases.
    "qwen2.5-3b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, hidden_act="silu",
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768, max_window_layers=36,
        initializer_range=0.02),
    # Not published: a 0.74B llama for the default suite's memory test (tests/model/test_stream_memory.py):
    # big enough that holding it whole shows in peak RSS, small enough to build in seconds.
    "stream-test": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1536, intermediate_size=6144,
        num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=4, head_dim=128, hidden_act="silu",
        vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, attention_bias=False, mlp_bias=False, initializer_range=0.02),
    # Not published: small shapes for tests (every in_features a multiple of 256, vocab larger than the
    # fixture tokenizer's 1024 so the padding is exercised, untied / biased variants).
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_act="silu",
        vocab_size=1536, tie_word_embeddings=False, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, attention_bias=False, mlp_bias=False, initializer_range=0.02),
    "tiny-qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        vocab_size=1280, tie_word_embeddings=True, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1000000.0, use_sliding_window=False, initializer_range=0.02),
}
# Published parameter counts (tied embedding counted once), checked against the built shapes.
PUBLISHED_PARAMS = {"llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "qwen2.5-3b": 3.09e9}
DEFAULT_SHARD = {"tiny": 1_000_000, "tiny-qwen2": 1_000_000}  # bytes; tiny shapes still get several shards
DEFAULT_MAX_SHARD = 2_000_000_000


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for suffix, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def build_config(shape: str):
    from transformers import AutoConfig

    tj = json.loads((FIXTURE / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec, bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
                               pad_token_id=ids["<|pad|>"], use_cache=True)
    cfg.dtype = "bfloat16"
    return cfg


def tensor_plan(cfg) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, init)] in state-dict order, tied weights once; init is 'normal', 'zeros' or 'ones'."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    kinds: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                kinds[full] = "normal" if pname == "weight" else "zeros"
            elif pname == "weight" and p.dim() == 1:  # RMSNorm
                kinds[full] = "ones"
            elif pname == "bias":
                kinds[full] = "zeros"
            else:
                raise SystemExit(f"no init rule for {full} ({type(mod).__name__}, shape {tuple(p.shape)})")
    plan = []
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied lm_head is listed once
        if p.dtype != torch.bfloat16:
            raise SystemExit(f"{name} is {p.dtype}, expected bfloat16")
        plan.append((name, tuple(p.shape), kinds[name]))
    return plan


def shard_plan(plan, max_shard: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = _numel(item[1]) * 2
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_tensor(name: str, shape, init: str, std: float, seed: int):
    import torch

    if init == "ones":
        return torch.ones(shape, dtype=torch.bfloat16)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(_seed(seed, name))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=g)


def write_shard(path: Path, items, std: float, seed: int) -> int:
    """Stream one safetensors file: header from the shapes, then each tensor as it is generated."""
    import torch

    from birdbone_core.model.stream import SafetensorsWriter

    writer = SafetensorsWriter(path, [(name, torch.bfloat16, shape) for name, shape, _ in items])
    try:
        for name, shape, init in items:
            writer.write(name, make_tensor(name, shape, init, std, seed))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return sum(_numel(shape) * 2 for _, shape, _ in items)


def _pre_tokenizer(model_type: str) -> tuple[dict | None, dict]:
    """(normalizer, pre_tokenizer) of the family's own byte-level BPE tokenizer: the Llama 3 split regex
    (llama.cpp pre-tokenizer "llama-bpe") or Qwen2's with NFC ("qwen2"). transformers 5 forces the latter on
    any qwen2 model (Qwen2Tokenizer), so writing it keeps tokenizer.json and the loaded tokenizer in step."""
    from birdbone_core.export.vocab import LLAMA3_REGEX, QWEN2_REGEX

    regex = {"llama": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[model_type]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return ({"type": "NFC"} if model_type == "qwen2" else None), pre


def write_tokenizer(out: Path, cfg) -> None:
    tj = json.loads((FIXTURE / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    n, vocab_size = len(vocab), cfg.vocab_size
    if vocab_size < n:
        raise SystemExit(f"vocab_size {vocab_size} is smaller than the fixture tokenizer's {n} tokens")
    if sorted(vocab.values()) != list(range(n)) or tj["model"].get("ignore_merges"):
        raise SystemExit("fixture tokenizer: expected dense ids 0..n-1 and ignore_merges false")
    for i in range(n, vocab_size):
        vocab[f"<|filler_{i}|>"] = i  # no merge produces these: never emitted, one GGUF token per row
    tj["normalizer"], tj["pre_tokenizer"] = _pre_tokenizer(cfg.model_type)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    tc["model_max_length"] = cfg.max_position_embeddings
    tc["unk_token"] = None  # else Qwen2Tokenizer adds its default unk <|endoftext|> as token vocab_size
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")


def check(out: Path, cfg, plan, forward: bool) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    c2 = AutoConfig.from_pretrained(out)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(c2, k) == getattr(cfg, k), k
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(out)
    t_tok = time.time() - t0
    assert len(tok) == cfg.vocab_size, (len(tok), cfg.vocab_size)
    sample = "The quick brown fox jumps over the lazy dog."
    ids = tok(sample)["input_ids"]
    assert ids[0] == cfg.bos_token_id and max(ids) < 1024 and tok.decode(ids, skip_special_tokens=True) == sample
    from birdbone_core.export.vocab import _backend_json, _bytelevel_pre_name

    pre_name = _bytelevel_pre_name(_backend_json(tok))  # what GGUF export will write as tokenizer.ggml.pre
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert set(wm) == {n for n, _, _ in plan}, "index does not cover exactly the model's parameters"
    for shard in sorted(set(wm.values())):
        with safe_open(str(out / shard), framework="pt") as f:
            keys = set(f.keys())
            assert keys == {n for n, s in wm.items() if s == shard}, shard
            for name, shape, _ in plan:
                if name in keys:
                    sl = f.get_slice(name)
                    assert tuple(sl.get_shape()) == shape and sl.get_dtype() == "BF16", name
    print(f"check: config, tokenizer ({len(tok)} tokens, loaded in {t_tok:.2f} s, "
          f"{len(sample)} chars -> {len(ids) - 1} tokens, GGUF pre-tokenizer {pre_name!r}), "
          f"index and {len(set(wm.values()))} shard headers ok")
    if forward:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        sd = model.state_dict()
        with safe_open(str(out / wm[plan[1][0]]), framework="pt") as f:
            assert torch.equal(sd[plan[1][0]], f.get_tensor(plan[1][0]))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
        print(f"check: AutoModelForCausalLM loaded ({model.dtype}), forward logits {tuple(logits.shape)} finite")


def make(shape: str, out: Path | None, seed: int = 0, max_shard: int | None = None, force: bool = False,
         verify: bool = True, dry_run: bool = False) -> dict:
    from transformers import GenerationConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out = Path(out) if out is not None else None
    if out is None and not dry_run:
        raise SystemExit("an output directory is required unless dry_run")
    if out is not None and not dry_run and not force and out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty (use --force to replace it)")
    max_shard = max_shard or DEFAULT_SHARD.get(shape, DEFAULT_MAX_SHARD)
    t0 = time.time()
    cfg = build_config(shape)
    plan = tensor_plan(cfg)
    n_params = sum(_numel(s) for _, s, _ in plan)
    total_bytes = 2 * n_params
    if shape in PUBLISHED_PARAMS:
        pub = PUBLISHED_PARAMS[shape]
        if abs(n_params - pub) > 0.005e9:
            raise SystemExit(f"{shape}: {n_params:,} parameters, published {pub / 1e9:.2f}B")
    shards = shard_plan(plan, max_shard)
    print(f"{shape}: {n_params:,} parameters ({n_params / 1e9:.3f}B), {total_bytes:,} bytes bf16, "
          f"{len(plan)} tensors in {len(shards)} shard(s) of at most {max_shard:,} bytes", flush=True)
    result = {"shape": shape, "out": str(out), "parameters": n_params, "bytes": total_bytes, "shards": len(shards)}
    if dry_run:
        for i, items in enumerate(shards, 1):
            print(f"  shard {i}: {len(items)} tensors, {sum(_numel(sh) * 2 for _, sh, _ in items):,} bytes")
        return result

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        write_tokenizer(tmp, cfg)
        weight_map: dict[str, str] = {}
        std = cfg.initializer_range
        for i, items in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            ts = time.time()
            nbytes = write_shard(tmp / fname, items, std, seed)
            weight_map.update({name: fname for name, _, _ in items})
            print(f"  {fname}: {len(items)} tensors, {nbytes:,} bytes, {time.time() - ts:.1f} s", flush=True)
        index = {"metadata": {"total_parameters": n_params, "total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# {shape} (random weights, benchmarks only)\n\nWritten by tests/benchmarks/make_models.py "
            f"{shape} --seed {seed}: the published architecture with random bf16 weights "
            f"(N(0, {std}), norms 1, biases 0) and the tiny-llama fixture tokenizer padded to "
            f"{cfg.vocab_size} tokens. {n_params:,} parameters. Not a trained model.\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {out} in {wall:.1f} s (peak RSS so far {peak_mb:.0f} MB)", flush=True)
    if verify:
        check(out, cfg, plan, forward=shape.startswith("tiny"))
    return {**result, "seconds": wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("out", type=Path, nargs="?", help="output directory (not needed with --dry-run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", type=parse_size, default=None,
                    help="e.g. 2GB (default 2GB; 1MB for the tiny shapes)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--no-check", action="store_true", help="skip loading the result back")
    ap.add_argument("--dry-run", action="store_true", help="print the parameter count and shard plan only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    if a.out is None and not a.dry_run:
        ap.error("OUT is required unless --dry-run")
    import torch

    torch.set_num_threads(a.threads)
    make(a.shape, a.out, seed=a.seed, max_shard=a.max_shard_size, force=a.force, verify=not a.no_check,
         dry_run=a.dry_run)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
