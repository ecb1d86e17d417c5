#!/usr/bin/env python3
"""Time xlsr-jax's jitted train step against transformers' PyTorch Wav2Vec2ForCTC, in one process.

    python scripts/bench_train.py --config small --repeats 5        # CPU: demo + ~20M model, fp32
    python scripts/bench_train.py --config xlsr53                    # GPU/TPU: XLSR-53 shape, bf16
    python scripts/bench_train.py --config xlsr53 --compile-only     # 4 vs 24 layers compile times

Both sides get the same Wav2Vec2Config, the same random batch (labels padded with -100), the same
optimizer (AdamW, constant learning rate, no weight decay, gradients clipped to norm 1) and the same
training-mode regularisation (dropout, layerdrop, SpecAugment), in fp32 on CPU and in bf16 on an
accelerator (torch: bf16 autocast and SDPA attention; jax: dtype=bfloat16; float32 weights on both).
After the first step (compile time), each side runs blocks of warm-up + timed steps, the blocks
alternating jax, torch, torch, jax so a drift in load touches both; medians are reported, with the
timed steps' 10th-90th percentile (the machine's step-to-step noise and, with layerdrop, the layers a
step ran). Random weights and data: this measures speed, not learning. The process runs with the malloc
setting `xlsr-jax` applies (xlsr_jax/malloc.py: freed memory kept for the next step), which PyTorch's CPU
side shares; `--system-malloc` keeps glibc's defaults for both.

The last line printed is `jax/pytorch speed ratio: X.XX`: PyTorch's median step time over jax's (> 1:
jax is faster), the geometric mean over the benchmarked models.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# jax and torch share the accelerator: jax must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from transformers import Wav2Vec2Config  # noqa: E402

from xlsr_jax.config import POS_CONV_IMPLS, REMAT_POLICIES, ModelConfig, OptimConfig, load_config  # noqa: E402
from xlsr_jax.data.batch import LABEL_PAD  # noqa: E402
from xlsr_jax.malloc import retain_freed_memory  # noqa: E402
from xlsr_jax.model import FlaxWav2Vec2ForCTC, ctc_loss, feat_extract_output_lengths, num_params  # noqa: E402
from xlsr_jax.train.optim import build_optimizer  # noqa: E402
from xlsr_jax.train.state import create_state  # noqa: E402
from xlsr_jax.train.step import train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLING_RATE = 16000
VOCAB = 40  # a character vocabulary's size; the last id is the pad/blank
OPTIM = OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0,
                    adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, max_grad_norm=1.0)

XLSR53 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
              conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
# ~20M parameters: XLSR's shape (conv strides, layer-norm feature encoder, stable layer norm), scaled down.
SMALL_20M = dict(XLSR53, hidden_size=384, num_hidden_layers=8, num_attention_heads=6, intermediate_size=1536,
                 conv_dim=(256,) * 7, num_conv_pos_embeddings=64)

# Dense bf16 FLOP/s per chip, matched in order against jax's device_kind.
PEAK_BF16 = ((r"H100|H200", 989e12), (r"A100", 312e12), (r"\bL4\b", 121e12), (r"TPU v4", 275e12),
             (r"v5 ?lite|v5e", 197e12), (r"v5p|TPU v5$", 459e12), (r"v6 ?lite|v6e", 918e12))


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model and batch shape."""

    name: str
    arch: dict  # Wav2Vec2Config architecture kwargs
    regularisation: dict  # dropout / layerdrop / SpecAugment Wav2Vec2Config kwargs
    batch: int
    seconds: float
    frozen: bool  # feature encoder frozen


def config_cases(config: str, frozen: bool | None) -> list[Case]:
    """The cases of `--config`: `small` for a CPU, `xlsr53` for an accelerator."""
    xlsr_reg = ModelConfig().regularisation()  # XLSR fine-tuning defaults (layerdrop 0.1, ...)
    if config == "xlsr53":
        frozen = True if frozen is None else frozen
        return [Case("xlsr53-b8x10s", XLSR53, xlsr_reg, 8, 10.0, frozen),
                Case("xlsr53-b32x5s", XLSR53, xlsr_reg, 32, 5.0, frozen)]
    demo = load_config(REPO / "configs" / "demo.yaml").model
    frozen = bool(frozen)
    return [Case("demo", dict(demo.architecture), demo.regularisation(), 8, 4.0, frozen),
            Case("20m", SMALL_20M, xlsr_reg, 8, 4.0, frozen)]


def wav2vec2_config(case: Case) -> Wav2Vec2Config:
    """The one config both frameworks build their model from (HF's blank is pad_token_id)."""
    return Wav2Vec2Config(**case.arch, **case.regularisation, vocab_size=VOCAB, pad_token_id=VOCAB - 1,
                          ctc_zero_infinity=True)


def make_batch(config: Wav2Vec2Config, batch: int, seconds: float, seed: int = 0) -> dict:
    """Random audio and random labels of ~15 characters a second (at most half the frames, so CTC stays
    feasible), padded with -100 to the longest."""
    rng = np.random.default_rng(seed)
    samples = int(seconds * SAMPLING_RATE)
    frames = int(feat_extract_output_lengths(config, samples))
    longest = max(1, min(int(15 * seconds), frames // 2))
    lengths = rng.integers((3 * longest) // 4, longest + 1, batch)
    lengths[0] = longest
    labels = rng.integers(0, VOCAB - 1, (batch, longest)).astype(np.int32)
    labels[np.arange(longest)[None, :] >= lengths[:, None]] = LABEL_PAD
    return {"input_values": rng.standard_normal((batch, samples)).astype(np.float32),
            "attention_mask": np.ones((batch, samples), np.int32),
            "labels": labels,
            "example_mask": np.ones((batch,), np.float32)}


def model_flops(config: Wav2Vec2Config, batch: int, samples: int, frozen: bool) -> float:
    """Model FLOPs of one training step (forward + backward; no recomputation, all layers even though
    layerdrop skips some): 6 x matmul weights used per frame x frames, attention scores and values, and
    the conv feature encoder (forward only when frozen)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    frames = int(feat_extract_output_lengths(config, samples))
    per_frame = (config.conv_dim[-1] * h  # feature projection
                 + h * (h // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
                 + layers * (4 * h * h + 2 * h * config.intermediate_size)
                 + h * config.vocab_size)  # CTC head
    dense = 6 * per_frame * batch * frames
    attention = layers * 3 * 2 * 2 * batch * frames**2 * h  # (QK^T, AV) x 2 FLOP/MAC x (fwd + 2 bwd)
    conv_macs, length, channels_in = 0, samples, 1
    for channels, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        conv_macs += batch * length * channels_in * channels * kernel
        channels_in = channels
    return dense + attention + (2 if frozen else 6) * conv_macs


def peak_flops(device_kind: str) -> float | None:
    """The chip's dense bf16 peak, or None for one not in the table (CPUs)."""
    for pattern, peak in PEAK_BF16:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return peak
    return None


def import_torch():
    """The PyTorch side's imports, deferred so that --skip-torch runs where torch is not installed."""
    import torch
    from transformers import Wav2Vec2ForCTC
    return torch, Wav2Vec2ForCTC


# --- jax side ------------------------------------------------------------------------------------------


def jax_model(config: Wav2Vec2Config, *, bf16: bool, frozen: bool, remat: str, scan: bool, attention: str,
              pos_conv: str) -> FlaxWav2Vec2ForCTC:
    return FlaxWav2Vec2ForCTC(config, dtype=jnp.bfloat16 if bf16 else jnp.float32, freeze_feature_encoder=frozen,
                              remat_policy=remat, scan_layers=scan, attention=attention, pos_conv=pos_conv)


def jax_train_step(model: FlaxWav2Vec2ForCTC, params, frozen: bool):
    """(jitted train step with the state donated, a function params -> fresh TrainState)."""
    tx, schedule = build_optimizer(OPTIM, 1000, params, frozen)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                     blank_id=model.config.pad_token_id, reduction="mean"), donate_argnums=0)
    return step, lambda p: create_state(p, tx, 0)


def trainable_count(params, frozen: bool) -> int:
    """Parameters the optimizer updates: all but the conv feature encoder when it is frozen."""
    if frozen:
        params = {**params, "wav2vec2": {k: v for k, v in params["wav2vec2"].items() if k != "feature_extractor"}}
    return num_params(params)


class JaxSide:
    """xlsr-jax's train step on one device-resident batch; the state is donated and replaced each step."""

    name = "jax"

    def __init__(self, config: Wav2Vec2Config, batch: dict, model_options: dict):
        self.model = jax_model(config, **model_options)
        params = self.model.init_params(jax.random.key(0))
        self.total, self.trainable = num_params(params), trainable_count(params, model_options["frozen"])
        self.jitted, new_state = jax_train_step(self.model, params, model_options["frozen"])
        self.state = jax.jit(new_state)(params)
        self.batch = jax.device_put(batch)
        self.compiled = self.loss = None

    def first_step(self) -> None:
        """Trace, compile and run once (what a training run waits for before its first step); the
        compiled executable also gives XLA's FLOP count."""
        self.compiled = self.jitted.lower(self.state, self.batch).compile()
        self.step()

    def step(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = metrics["loss"]

    def xla_flops(self) -> float | None:
        try:
            cost = self.compiled.cost_analysis()
        except Exception:  # noqa: BLE001 - a backend without cost analysis
            return None
        if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
            cost = cost[0] if cost else None
        return (cost or {}).get("flops")

    def xla_memory(self) -> str:
        """XLA's plan for the step's device memory: arguments (state + batch), outputs, temporaries."""
        try:
            m = self.compiled.memory_analysis()
        except Exception:  # noqa: BLE001 - a backend without memory analysis
            return "n/a"
        if m is None:
            return "n/a"
        return (f"arguments {_gib(m.argument_size_in_bytes)}, outputs {_gib(m.output_size_in_bytes)}, "
                f"temporaries {_gib(m.temp_size_in_bytes)}")

    def op_census(self) -> str:
        """How many instructions of the kinds that move data the compiled step has (a scanned layer's
        body counts once): copies and dynamic-update-slices, next to the fusions and library calls."""
        text = self.compiled.as_text() or ""
        ops = collections.Counter(re.findall(r"^\s*(?:ROOT )?%\S+ = .*?\s([a-z][a-z0-9-]*)\(", text, re.MULTILINE))
        return ", ".join(f"{ops[k]} {k}" for k in ("copy", "copy-start", "dynamic-update-slice", "fusion",
                                                    "custom-call", "while", "conditional"))

    def op_names(self) -> dict[str, str]:
        """The compiled step's instruction name -> its jax name stack (from the optimized HLO)."""
        text = self.compiled.as_text() or ""
        return dict(re.findall(r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"', text, re.MULTILINE))

    def profile(self, steps: int, out_dir: Path) -> Path | None:
        """Run `steps` steps under jax's profiler; the Perfetto trace it wrote."""
        out_dir.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
            for _ in range(steps):
                self.step()
        traces = sorted(out_dir.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda f: f.stat().st_mtime)
        return traces[-1] if traces else None

    def ctc_probe(self):
        """(jitted CTC loss and its gradient, random float32 logits [batch, frames, vocab]) at this step's
        shapes, with the batch's labels."""
        batch, samples = self.batch["input_values"].shape
        config = self.model.config
        frames = int(feat_extract_output_lengths(config, samples))
        logits = jax.random.normal(jax.random.key(0), (batch, frames, config.vocab_size), jnp.float32)
        frame_mask = jnp.ones((batch, frames), bool)
        labels = self.batch["labels"]
        return jax.jit(jax.value_and_grad(
            lambda x: ctc_loss(x, frame_mask, labels, blank_id=config.pad_token_id)[0])), logits

    def ctc_seconds(self, repeats: int) -> float:
        """Median time of the step's CTC loss alone, forward and backward (`ctc_probe`): how much of a step
        the loss's two scans over the frames (a chain of small kernels per frame on an accelerator) take."""
        loss_and_grad, logits = self.ctc_probe()
        jax.block_until_ready(loss_and_grad(logits))
        return statistics.median(_seconds(lambda: jax.block_until_ready(loss_and_grad(logits)))
                                 for _ in range(repeats))

    def peak_bytes(self) -> int | None:
        """Peak device memory of this process so far (JAX cannot reset it between models)."""
        if jax.default_backend() == "cpu":
            return None
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


# --- PyTorch side --------------------------------------------------------------------------------------


class TorchSide:
    """transformers' Wav2Vec2ForCTC in training mode with torch.optim.AdamW and gradient clipping."""

    name = "pytorch"

    def __init__(self, config: Wav2Vec2Config, batch: dict, *, bf16: bool, frozen: bool, remat: bool):
        torch, Wav2Vec2ForCTC = import_torch()
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = bf16
        torch.manual_seed(0)
        model = Wav2Vec2ForCTC._from_config(Wav2Vec2Config.from_dict(config.to_dict()),
                                            attn_implementation="sdpa")
        if frozen:
            model.freeze_feature_encoder()
        if remat:  # transformers renamed gradient_checkpointing_enable (deprecated since about 5.2x)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.to(self.device).train()  # dropout, layerdrop and SpecAugment on
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.total = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in self.params)
        # float32 weights and optimizer state, as on the jax side; fused AdamW is CUDA's fastest.
        self.optimizer = torch.optim.AdamW(self.params, lr=OPTIM.learning_rate, betas=(OPTIM.adam_b1, OPTIM.adam_b2),
                                           eps=OPTIM.adam_eps, weight_decay=0.0, fused=self.device.type == "cuda")
        self.inputs = {"input_values": torch.from_numpy(batch["input_values"]).to(self.device),
                       "attention_mask": torch.from_numpy(batch["attention_mask"]).to(self.device),
                       "labels": torch.from_numpy(batch["labels"]).long().to(self.device)}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.loss = None

    def first_step(self) -> None:
        self.step()

    def step(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, OPTIM.max_grad_norm)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.loss = loss.detach()

    def xla_flops(self) -> None:
        return None

    def profile(self, steps: int, out_dir: Path) -> None:
        """Run `steps` steps under torch's profiler; print its table of device kernels and keep the trace."""
        torch = self.torch
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out_dir / "torch_trace.json"))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        print(f"  pytorch profile, {steps} steps (times are totals over them):")
        print(prof.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS, max_name_column_width=70))

    def peak_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated(self.device)


# --- profiling -----------------------------------------------------------------------------------------

PROFILE_ROWS = 25
# Where a jax op's time goes, by the Flax module in its name stack (the first pattern that matches).
SCOPES = (("dropout (masks)", r"_bernoulli|_uniform|random_bits|threefry|keep_mask|Dropout_\d+/"),
          ("feature encoder (conv)", r"feature_extractor"), ("feature projection", r"feature_projection"),
          ("positional conv", r"pos_conv_embed"), ("attention", r"/attention/"),
          ("feed-forward", r"feed_forward"), ("layer norms", r"layer_norm"), ("CTC head", r"lm_head"),
          ("SpecAugment", r"mask"), ("loss", r"ctc|loss"), ("optimizer", r"adam|optax|clip|global_norm|update"))


def _scope(name_stack: str) -> str:
    """A jax op's part of the model, from its name stack; "backward" when autodiff's transpose made it."""
    part = next((label for label, pattern in SCOPES if re.search(pattern, name_stack)), "other")
    return f"{part}{' (backward)' if 'transpose(' in name_stack else ''}"


def busy_time(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(time covered by at least one of the [start, end) intervals, last end - first start): on a device
    line, busy < span means the device waited (for the host, a copy or a sync)."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy, (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0


def summarize_jax_trace(path: Path, steps: int, op_names: dict[str, str]) -> None:
    """Device time per op from jax's Perfetto trace: for each device line (XLA's ops, each CUDA stream) the
    ops that took longest, in ms per step, and the ops' time by model part (from their name stacks:
    the trace's own, else `op_names`, instruction -> name stack from the compiled HLO)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if re.search(r"GPU|TPU", name)} or set(processes)
    per_line: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    per_scope: collections.Counter = collections.Counter()
    stacks: dict[str, str] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        line = f"{processes[e['pid']]} {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
        per_line[line][e["name"]] += e.get("dur", 0.0)
        spans[line].append((float(e["ts"]), float(e["ts"]) + e.get("dur", 0.0)))
        args = e.get("args") or {}
        # The compiled HLO's name stack first: on a GPU the trace's tf_op reads only "XlaModule:".
        stack = op_names.get(str(args.get("hlo_op", e["name"])), "")
        if not stack and "/" in str(args.get("tf_op", "")):
            stack = str(args["tf_op"])
        if stack:
            stacks.setdefault(e["name"], stack)
            per_scope[line, _scope(stack)] += e.get("dur", 0.0)
    for line, ops in sorted(per_line.items()):
        total = sum(ops.values())
        if total <= 0:
            continue
        busy, span = busy_time(spans[line])
        print(f"  jax profile, {line}: {total / steps / 1000:.1f} ms per step over {len(ops)} ops; busy "
              f"{busy / steps / 1000:.1f} ms of a {span / steps / 1000:.1f} ms span per step")
        for name, us in ops.most_common(PROFILE_ROWS):
            print(f"    {us / steps / 1000:8.2f} ms {us / total:6.1%}  {name[:60]:60s} {stacks.get(name, '')[-90:]}")
    # GPU traces show each op twice (XLA's op line and the CUDA stream's kernel): add up XLA's op lines only;
    # a CPU trace spreads the ops over the thread pool's lines: add up all of them.
    op_lines = {line for line, _ in per_scope if "XLA Ops" in line} or {line for line, _ in per_scope}
    parts: collections.Counter = collections.Counter()
    for (line, part), us in per_scope.items():
        if line in op_lines:
            parts[part] += us
    if parts:
        total = sum(parts.values())
        print(f"  jax profile by model part ({', '.join(sorted(op_lines))}; ms per step, ops with a name stack):")
        for part, us in parts.most_common():
            print(f"    {us / steps / 1000:8.2f} ms {us / total:6.1%}  {part}")


def profile_case(sides: list, case: Case, steps: int, out_dir: Path) -> None:
    """Profile `steps` steps of each side; print the summaries, keep the traces under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for side in sides:
        if isinstance(side, JaxSide):
            with tempfile.TemporaryDirectory() as raw:
                trace = side.profile(steps, Path(raw))
                if trace is None:
                    print("  jax profile: no Perfetto trace written")
                    continue
                kept = out_dir / f"jax_{case.name}.json.gz"
                shutil.copy(trace, kept)
            summarize_jax_trace(kept, steps, side.op_names())
        else:
            side.profile(steps, out_dir)
            raw = out_dir / "torch_trace.json"
            with open(raw, "rb") as src, gzip.open(out_dir / f"torch_{case.name}.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()


# --- measuring -----------------------------------------------------------------------------------------


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Timing:
    """One side's first step (trace + compile + run) and its timed steps, in seconds."""

    first: float
    steps: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.steps)

    def spread(self) -> tuple[float, float]:
        """(10th, 90th percentile) of the timed steps: the machine's step-to-step noise and, with layerdrop,
        the layers a step ran; the ratio of medians is read against it."""
        if len(self.steps) < 2:
            return self.steps[0], self.steps[0]
        deciles = statistics.quantiles(self.steps, n=10, method="inclusive")
        return deciles[0], deciles[-1]


def measure(sides: list, warmup: int, repeats: int, rounds: int = 2) -> dict[str, Timing]:
    """name -> its Timing. Each side runs in blocks (warm-up steps, then `repeats` timed steps), the
    blocks alternating between the sides for `rounds` rounds, so a drift in machine load touches both.
    Not step by step: on CPU the two runtimes' thread pools disturb each other when their steps
    alternate (measured on the 20m case, 2 cores: jax 3.19 s alone vs 3.76 s interleaved with torch)."""
    first = {side.name: _seconds(side.first_step) for side in sides}
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            for _ in range(warmup):
                side.step()
            times[side.name].extend(_seconds(side.step) for _ in range(repeats))
    return {name: Timing(first[name], tuple(t)) for name, t in times.items()}


def _gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def report_side(side, timing: Timing, audio_s: float, flops: float) -> None:
    """One line per framework: first step, median step (and the timed steps' 10th-90th percentile),
    throughput, peak memory, MFU."""
    peak = peak_flops(jax.devices()[0].device_kind)
    step_s = timing.median
    low, high = timing.spread()
    mfu = f"MFU {flops / step_s / peak:6.1%}" if peak else "MFU n/a"
    print(f"  {side.name:8s} first step (compile) {timing.first:7.2f} s   step {step_s * 1000:9.1f} ms "
          f"(p10-p90 of {len(timing.steps)}: {low * 1000:.0f}-{high * 1000:.0f})   {audio_s / step_s:8.1f} "
          f"audio-s/s   peak memory {_gib(side.peak_bytes())}   {mfu}   loss {float(side.loss):.3f}", flush=True)


def jax_remat(args) -> str:
    """The jax side's remat policy: --remat-policy, else full with --remat (as PyTorch's checkpointing),
    else none."""
    return args.remat_policy or ("full" if args.remat else "none")


def bench_case(case: Case, args, bf16: bool) -> float | None:
    """Benchmark one case; its jax/pytorch speed ratio (None with --skip-torch)."""
    config = wav2vec2_config(case)
    batch = make_batch(config, case.batch, case.seconds)
    samples = batch["input_values"].shape[1]
    remat = jax_remat(args)
    torch_remat = "" if args.skip_torch else f" (pytorch: {'full' if args.remat else 'none'})"
    print(f"\n== {case.name}: batch {case.batch} x {case.seconds:g} s "
          f"({int(feat_extract_output_lengths(config, samples))} frames), {config.num_hidden_layers} layers "
          f"x {config.hidden_size}, feature encoder {'frozen' if case.frozen else 'trained'}, "
          f"remat {remat}{torch_remat}, {'bf16' if bf16 else 'fp32'}, attention dropout "
          f"{case.regularisation.get('attention_dropout', 0.0):g}, "
          f"layerdrop {case.regularisation.get('layerdrop', 0.0):g}",
          flush=True)
    jax_side = JaxSide(config, batch, dict(bf16=bf16, frozen=case.frozen, remat=remat, scan=args.scan,
                                           attention=args.attention, pos_conv=args.pos_conv))
    sides = [jax_side]
    if not args.skip_torch:
        sides.append(TorchSide(config, batch, bf16=bf16, frozen=case.frozen, remat=args.remat))
    print("  params: " + ", ".join(f"{s.name} {s.total:,} ({s.trainable:,} trainable)" for s in sides),
          flush=True)
    assert len({s.trainable for s in sides}) == 1, "the frameworks' trainable parameter counts differ"
    results = measure(sides, args.warmup, args.repeats)
    flops = model_flops(config, case.batch, samples, case.frozen)
    xla = jax_side.xla_flops()
    xla_note = (f"; XLA cost analysis {xla:.3e} = x{xla / flops:.2f} (it counts elementwise ops too, and a "
                f"scanned layer once)" if xla else "")
    print(f"  model FLOPs per step {flops:.3e} (analytic){xla_note}")
    for side in sides:
        report_side(side, results[side.name], case.batch * case.seconds, flops)
    print(f"  jax XLA memory plan: {jax_side.xla_memory()}", flush=True)
    print(f"  jax compiled program: {jax_side.op_census()}", flush=True)
    ctc_s = jax_side.ctc_seconds(max(args.repeats, 3))
    print(f"  jax CTC loss alone (fwd+bwd, float32): {ctc_s * 1000:.2f} ms = {ctc_s / results['jax'].median:.1%} "
          f"of the step", flush=True)
    if args.profile:
        profile_case(sides, case, args.profile, Path(args.profile_dir))
    if args.skip_torch:
        return None
    ratio = results["pytorch"].median / results["jax"].median
    print(f"{case.name}: jax/pytorch speed ratio: {ratio:.2f}", flush=True)
    return ratio


# --- compile time vs depth -----------------------------------------------------------------------------


def compile_seconds(case: Case, layers: int, scan: bool, args, bf16: bool) -> tuple[float, float]:
    """(trace + lower s, XLA compile s) of the train step for `case` with `layers` layers; abstract
    parameters and batch, so nothing is allocated."""
    config = wav2vec2_config(dataclasses.replace(case, arch={**case.arch, "num_hidden_layers": layers}))
    model = jax_model(config, bf16=bf16, frozen=case.frozen, remat=jax_remat(args),
                      scan=scan, attention=args.attention, pos_conv=args.pos_conv)
    params = model.abstract_params()
    step, new_state = jax_train_step(model, params, case.frozen)
    state = jax.eval_shape(new_state, params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in make_batch(config, case.batch, case.seconds).items()}
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def compile_report(case: Case, args, bf16: bool) -> None:
    """Compile time at 4 and 24 layers (--compile-depths) with and without scan_layers: a scanned stack
    should compile in about the same time at any depth."""
    shallow, deep = args.compile_depths
    print(f"\n== compile time of the jax train step, {case.name} architecture, batch {case.batch} x "
          f"{case.seconds:g} s (persistent compilation cache off)", flush=True)
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        # Untimed: fills the process's one-time caches (e.g. GPU autotuning of these matmul shapes) that
        # the first timed compile would otherwise pay alone.
        compile_seconds(case, 2, False, args, bf16)
        totals = {}
        for scan in (True, False):
            for layers in (shallow, deep):
                lower_s, compile_s = compile_seconds(case, layers, scan, args, bf16)
                totals[scan, layers] = lower_s + compile_s
                print(f"  {layers:2d} layers, scan {'on ' if scan else 'off'}: lower {lower_s:6.1f} s + "
                      f"compile {compile_s:6.1f} s = {lower_s + compile_s:6.1f} s", flush=True)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
    ratio = {scan: totals[scan, deep] / totals[scan, shallow] for scan in (True, False)}
    print(f"{deep}/{shallow} layers compile ratio with scan: {ratio[True]:.2f} (target <= 1.5)")
    print(f"{deep}/{shallow} layers compile ratio without scan: {ratio[False]:.2f}", flush=True)


# --- main ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("small", "xlsr53"), default="small",
                   help="small: demo + ~20M models, batch 8 x 4 s (CPU); xlsr53: XLSR-53, batch 8 x 10 s and "
                        "32 x 5 s, frozen feature encoder (GPU/TPU)")
    p.add_argument("--models", nargs="+", help="a subset of the config's cases (demo 20m | xlsr53-b8x10s "
                                               "xlsr53-b32x5s)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework after the first")
    p.add_argument("--threads", type=int, help="torch CPU threads (XLA's cannot be set after import)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on an accelerator, fp32 on CPU")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing on both sides (jax remat_policy=full)")
    p.add_argument("--remat-policy", choices=REMAT_POLICIES,
                   help="jax only: model.remat_policy (default: full with --remat, else none)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                   help="jax: scan over the transformer layers (scan_layers)")
    p.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the conv feature encoder (default: small no, xlsr53 yes)")
    p.add_argument("--attention", choices=("auto", "plain"), default="auto", help="jax attention kernel")
    p.add_argument("--pos-conv", choices=POS_CONV_IMPLS, default="auto",
                   help="jax positional convolution implementation")
    p.add_argument("--attention-dropout", type=float,
                   help="override every case's attention_dropout (0 lets jax train through the fused kernel)")
    p.add_argument("--layerdrop", type=float, help="override every case's layerdrop (0: no per-layer skip)")
    p.add_argument("--prng", choices=("threefry2x32", "rbg", "unsafe_rbg"), default="threefry2x32",
                   help="jax's PRNG for dropout, layerdrop and SpecAugment (jax_default_prng_impl)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS steps of each side and print where the device time goes")
    p.add_argument("--profile-dir", default=os.environ.get("OUT", "bench_profile"),
                   help="where the profiles' traces are kept (default $OUT, else ./bench_profile)")
    p.add_argument("--skip-torch", action="store_true", help="jax only (machines without torch)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's malloc defaults; by default the process (both sides) runs with the setting "
                        "`xlsr-jax` applies, freed memory kept for reuse (xlsr_jax/malloc.py)")
    p.add_argument("--compile-layers", action="store_true", help="also report compile time at 4 vs 24 layers")
    p.add_argument("--compile-only", action="store_true", help="only the 4 vs 24 layers compile report")
    p.add_argument("--compile-depths", type=int, nargs=2, default=(4, 24), metavar=("SHALLOW", "DEEP"),
                   help="the compile report's layer counts")
    shrink = p.add_argument_group("shrink every case (to try a config's code path on a CPU)")
    shrink.add_argument("--layers", type=int, help="transformer layers")
    shrink.add_argument("--batch", type=int, help="examples per batch")
    shrink.add_argument("--seconds", type=float, help="audio seconds per example")
    return p.parse_args(argv)


def select_cases(args) -> list[Case]:
    """The config's cases, filtered by --models and shrunk by --layers/--batch/--seconds."""
    cases = config_cases(args.config, args.frozen)
    if args.models:
        unknown = set(args.models) - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"--models: {sorted(unknown)} not in --config {args.config}: "
                             f"{[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.models]
    overrides = {key: value for key, value in (("layerdrop", args.layerdrop),
                                               ("attention_dropout", args.attention_dropout)) if value is not None}
    cases = [dataclasses.replace(c, regularisation={**c.regularisation, **overrides}) for c in cases]
    return [dataclasses.replace(c, arch={**c.arch, "num_hidden_layers": args.layers or c.arch["num_hidden_layers"]},
                                batch=args.batch or c.batch, seconds=args.seconds or c.seconds) for c in cases]


def print_header(args, bf16: bool) -> None:
    device = jax.devices()[0]
    torch_version = "not used (--skip-torch)"
    if not args.skip_torch:
        torch, _ = import_torch()
        if args.threads:
            torch.set_num_threads(args.threads)
        cuda = f", cuda {torch.version.cuda}" if torch.cuda.is_available() else ", no cuda"
        torch_version = f"{torch.__version__}{cuda}, {torch.get_num_threads()} threads"
        if jax.default_backend() != "cpu" and not torch.cuda.is_available():
            print("WARNING: jax runs on an accelerator but torch on the CPU: the ratio compares devices")
    print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}); "
          f"precision {'bf16' if bf16 else 'fp32'}; jax PRNG {args.prng}")
    print(f"jax {jax.__version__}, transformers {transformers.__version__}, torch {torch_version}; "
          f"{os.cpu_count()} CPUs (XLA uses them all); host malloc (both sides): {args.malloc}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    # As `xlsr-jax` does, before jax starts; one process, so PyTorch's CPU allocations get it too.
    args.malloc = "glibc defaults" if args.system_malloc or not retain_freed_memory() else "freed memory kept"
    jax.config.update("jax_default_prng_impl", args.prng)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and jax.default_backend() != "cpu")
    cases = select_cases(args)
    print_header(args, bf16)
    if args.compile_layers or args.compile_only:
        compile_report(cases[0], args, bf16)  # first: before the speed runs warm any cache
    if args.compile_only:
        return
    ratios = [bench_case(case, args, bf16) for case in cases]
    if args.skip_torch:
        print("jax/pytorch speed ratio: n/a")
    else:
        print(f"jax/pytorch speed ratio: {math.exp(statistics.fmean(math.log(r) for r in ratios)):.2f}")


if __name__ == "__main__":
    main()
