"""Sharding-layout benchmark: compile the real DiT train (or sampler) step ahead of time per layout.

For each layout (mesh sizes, rules preset, remat policy, attention backend, per-device batch) on a
target (simulated CPU devices, a compile-only TPU topology, or the local devices) the step is lowered
with abstract inputs (ShapeDtypeStructs carrying shardings: nothing is allocated) and compiled. The
compiler then says whether it fits, its per-device memory, FLOPs and collectives; a roofline over the
chip table turns those into a predicted step time and MFU. On `local` targets the step also runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax.bench.dit_speed import dit_flops
from sora_jax.bench.hlo_stats import collective_stats
from sora_jax.models.dit import DiT, dit_config
from sora_jax.parallel.mesh import MeshError, batch_sharding, replicated
from sora_jax.parallel.rules import MESH_AXES, get_rules
from sora_jax.parallel.topology import Chip, Target, target_mesh
from sora_jax.train.dit_trainer import dit_config_from, make_dit_step, null_text
from sora_jax.train.state import abstract_sharded_state, create_sharded_state, make_optimizer

STEPS = ("train", "sample")
# Wan2.1's VAE: 4x temporal, 8x spatial compression, 16 latent channels.
VAE_STRIDE = (4, 8, 8)
LATENT_CHANNELS = 16
_LAYOUT_KEYS = ("rules", "remat", "attention", "batch")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate: mesh axis sizes (-1 = the rest), rules preset, remat, attention, per-device batch."""

    mesh: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1), ("tensor", 1), ("sequence", 1))
    rules: str = "fsdp"
    remat: str = "full"
    attention: str = "xla"
    batch: float = 1.0  # examples per device: global batch = batch x devices

    @property
    def mesh_shape(self) -> dict[str, int]:
        """{axis: size} of the mesh."""
        return dict(self.mesh)

    @property
    def name(self) -> str:
        """Compact label: axes other than 1, then the rest ('fsdp=-1,tensor=4 fsdp_tensor full xla b1')."""
        axes = ",".join(f"{a}={s}" for a, s in self.mesh if s != 1) or "data=1"
        return f"{axes} {self.rules} {self.remat} {self.attention} b{self.batch:g}"


def parse_layout(spec: str) -> Layout:
    """'fsdp=-1,tensor=2,rules=fsdp_tensor,remat=full,attention=xla,batch=1' -> Layout (unset keys default)."""
    mesh = dict(Layout().mesh)
    fields: dict[str, Any] = {}
    explicit_fsdp = False
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"layout item {item!r} must be key=value (e.g. fsdp=8); layout: {spec!r}")
        if key in MESH_AXES:
            explicit_fsdp = explicit_fsdp or key == "fsdp"
            try:
                mesh[key] = int(value)
            except ValueError as e:
                raise ValueError(f"layout {spec!r}: mesh size {key}={value!r} must be an integer (-1 = rest)") from e
        elif key == "batch":
            fields[key] = float(value)
        elif key in _LAYOUT_KEYS:
            fields[key] = value
        else:
            raise ValueError(f"unknown layout key {key!r} in {spec!r}; use {list(MESH_AXES) + list(_LAYOUT_KEYS)}")
    if not explicit_fsdp and any(s == -1 for k, s in mesh.items() if k != "fsdp"):
        mesh["fsdp"] = 1  # another axis takes the rest, so fsdp's default -1 becomes 1
    if sum(s == -1 for s in mesh.values()) > 1:
        raise ValueError(f"layout {spec!r}: at most one mesh axis may be -1")
    get_rules(fields.get("rules", "fsdp"))
    return Layout(mesh=tuple((a, mesh[a]) for a in MESH_AXES), **fields)


def parse_layouts(text: str) -> list[Layout]:
    """Several layouts separated by ';' (or newlines)."""
    layouts = [parse_layout(s) for s in re.split(r"[;\n]", text) if s.strip()]
    if not layouts:
        raise ValueError("no layouts given; e.g. --layouts 'fsdp=-1;data=2,fsdp=-1'")
    return layouts


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is compiled: the config's DiT at a video size, with text of text_len tokens."""

    config: ml_collections.ConfigDict
    frames: int
    height: int
    width: int
    text_len: int
    dtype: str = "bfloat16"
    step: str = "train"
    guidance_batch: int = 2  # the sampler runs cond + uncond as one batch

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(T', H', W', C) of the video's latent."""
        t, h, w = VAE_STRIDE
        if (self.frames - 1) % t or self.height % h or self.width % w:
            raise ValueError(
                f"video {self.frames}x{self.height}x{self.width} does not fit the VAE: frames must be 4k+1 "
                "and height/width multiples of 8 (e.g. 81x480x832)"
            )
        return 1 + (self.frames - 1) // t, self.height // h, self.width // w, LATENT_CHANNELS


def parse_video(spec: str) -> tuple[int, int, int]:
    """'81x480x832' -> (frames, height, width)."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", spec.strip())
    if not m:
        raise ValueError(f"--video {spec!r} must be FRAMESxHEIGHTxWIDTH, e.g. 81x480x832")
    return tuple(int(g) for g in m.groups())


def model_config(workload: Workload, layout: Layout):
    """The DiTConfig of the workload's config with the layout's remat/attention and the compute dtype."""
    variant_text_dim = dit_config(workload.config.variant).text_dim
    cfg = dit_config_from(workload.config, channels=LATENT_CHANNELS, text_dim=variant_text_dim)
    return dataclasses.replace(cfg, remat=layout.remat, attention=layout.attention, dtype=jnp.dtype(workload.dtype))


def _sharded_bytes(tree: Any) -> float:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def _full_bytes(tree: Any) -> float:
    return float(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def parse_oom(message: str) -> dict[str, float] | None:
    """Required vs available bytes from XLA's out-of-memory message, or None if it is not one."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    # libtpu words it as "required for HLO temporaries (1.00T) exceeds available HBM (15.75G)" or
    # "Used 20.55G of 15.48G hbm".
    forms = (r"required[^(]*\(([\d.]+)([KMGT]?)i?B?\).*?available (\w+) \(([\d.]+)([KMGT]?)i?B?\)",
             r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? (\w+)")
    m = re.search(forms[0], message, re.S)
    if m:
        need, need_unit, space, have, have_unit = m.groups()
    else:
        m = re.search(forms[1], message)
        if not m:
            return {"required_bytes": float("nan"), "available_bytes": float("nan")}
        need, need_unit, have, have_unit, space = m.groups()
    return {"required_bytes": float(need) * units[need_unit], "available_bytes": float(have) * units[have_unit],
            "memory_space": space}


def _abstract_batch(mesh, global_batch: int, workload: Workload, text_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    tt, hh, ww, c = workload.latent_shape
    shapes = {"latents": ((global_batch, tt, hh, ww, c), jnp.float32),
              "text": ((global_batch, workload.text_len, text_dim), jnp.float32),
              "text_mask": ((global_batch, workload.text_len), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def sampler_step(model: DiT, guidance: float = 5.0):
    """One DiT evaluation of a sampler with classifier-free guidance (cond and uncond in one batch)."""

    def step(params, latents, t, text, text_mask):
        b = latents.shape[0]
        n_emb, n_mask = null_text(b, text.shape[1], text.shape[2])
        both = lambda a, n: jnp.concatenate([a, n.astype(a.dtype)])  # noqa: E731
        pred = model.apply(params, both(latents, latents), both(t, t), both(text, n_emb), both(text_mask, n_mask))
        cond, uncond = pred[:b], pred[b:]
        return uncond + guidance * (cond - uncond)

    return step


def build_step(workload: Workload, layout: Layout, target: Target) -> dict[str, Any]:
    """Mesh, abstract state and the jitted step with its abstract arguments for one layout."""
    mesh = target_mesh(target, layout.mesh_shape)
    rules = get_rules(layout.rules)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = layout.batch * target.num_devices
    if global_batch != int(global_batch) or int(global_batch) % shards:
        raise ValueError(
            f"per-device batch {layout.batch:g} x {target.num_devices} devices = {global_batch:g} examples, "
            f"not a multiple of the {shards} batch shards (data x fsdp)"
        )
    global_batch = int(global_batch)
    cfg = model_config(workload, layout)
    grid = workload.latent_shape[:3]
    tokens = math.prod(n // p for n, p in zip(grid, cfg.patch_size))
    if tokens % mesh.shape["sequence"]:
        raise ValueError(f"{tokens} video tokens are not divisible by sequence={mesh.shape['sequence']}")
    model = DiT(cfg)
    config = workload.config
    tx = make_optimizer(config.optim, int(config.train.steps))
    pt, ph, pw = cfg.patch_size
    dummy = lambda: (jnp.zeros((shards, pt, ph, pw, LATENT_CHANNELS)), jnp.zeros((shards,)),  # noqa: E731
                     jnp.zeros((shards, 1, cfg.text_dim)), jnp.ones((shards, 1), bool))
    init = lambda k: model.init({"params": k}, *dummy())  # noqa: E731
    state, state_sh = abstract_sharded_state(init, tx, float(config.optim.ema_decay), mesh, rules)
    batch = _abstract_batch(mesh, global_batch, workload, cfg.text_dim)
    rep = replicated(mesh)
    if workload.step == "train":
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
        fn = jax.jit(make_dit_step(model, config.diffusion), in_shardings=(state_sh, {k: v.sharding for k, v in batch.items()}, rep),
                     out_shardings=(state_sh, rep), donate_argnums=0)
        args = (state, batch, key)
        model_flops = dit_flops(cfg, global_batch, tokens, workload.text_len)["train_step"]
    else:
        t = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=batch_sharding(mesh, 1))
        fn = jax.jit(sampler_step(model), in_shardings=(state_sh.params, *(a.sharding for a in (batch["latents"], t, batch["text"], batch["text_mask"]))),
                     out_shardings=batch["latents"].sharding)
        args = (state.params, batch["latents"], t, batch["text"], batch["text_mask"])
        model_flops = workload.guidance_batch * dit_flops(cfg, global_batch, tokens, workload.text_len)["forward"]
    return {"mesh": mesh, "rules": rules, "fn": fn, "args": args, "state": state, "model": model, "cfg": cfg,
            "global_batch": global_batch, "tokens": tokens, "model_flops": model_flops, "tx": tx, "init": init}


# Forward passes per train step on top of the 3 of forward + backward: full remat recomputes the block
# forward once; dots keeps the matmul outputs, so it recomputes (almost) no FLOPs.
REMAT_RECOMPUTE = {"none": 0.0, "dots": 0.0, "offload": 0.0, "full": 1.0}


def roofline(flops: float, hbm_bytes: float, ici_bytes: float, dcn_bytes: float, model_flops: float,
             chip: Chip, peak_flops: float | None = None) -> dict[str, float]:
    """Per-device step-time terms (s), their max (perfect overlap) and sum (none), and predicted MFU."""
    per = chip.devices_per_chip
    peak = (peak_flops or chip.peak_flops) / per
    if not peak:
        return {}
    terms = {"compute_s": flops / peak,
             "hbm_s": hbm_bytes / (chip.hbm_bw / per) if chip.hbm_bw else 0.0,
             "ici_s": ici_bytes / (chip.ici_bw / per) if chip.ici_bw else 0.0,
             "dcn_s": dcn_bytes / (chip.dcn_bw / per) if chip.dcn_bw else 0.0}
    step = max(terms.values())
    return {**terms, "step_s": step, "step_s_no_overlap": sum(terms.values()),
            "bound": max(terms, key=terms.get).removesuffix("_s"), "mfu": model_flops / step / peak if step else 0.0}


def row_roofline(row: dict[str, Any], chip: Chip, peak_flops: float | None = None) -> dict[str, float]:
    """The roofline of a compiled row: FLOPs = max(XLA's count, model FLOPs x remat recompute)."""
    remat = row["layout_spec"]["remat"]
    hardware = row["model_flops"] * ((3.0 + REMAT_RECOMPUTE.get(remat, 0.0)) / 3.0 if row["step"] == "train" else 1.0)
    coll = row["collectives"]
    # XLA's cost analysis counts a while-loop body once, so its FLOPs miss all but one scanned block.
    return roofline(max(row["flops"], hardware), row["bytes_accessed"], coll["ici_wire_bytes"],
                    coll["dcn_wire_bytes"], row["model_flops"], chip, peak_flops)


def _measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this host (the MFU denominator of local CPU runs)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times)


def _run_locally(built: dict[str, Any], workload: Workload, steps: int) -> dict[str, float]:
    """Allocate the state and a random batch, run the step, return the median step time."""
    mesh, rules = built["mesh"], built["rules"]
    rng = jax.random.key(0)
    state, _ = create_sharded_state(built["init"], built["tx"], float(workload.config.optim.ema_decay), mesh, rules, rng)
    zeros = lambda tree: jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), tree)  # noqa: E731
    args = built["args"]
    concrete = (zeros(args[1]), rng) if workload.step == "train" else zeros(args[1:])
    times = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        first = state if workload.step == "train" else state.params
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            out = built["compiled"](first, *concrete)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            if workload.step == "train":
                first = out[0]
    return {"step_s": statistics.median(times[1:]), "times_s": times[1:]}


def bench_layout(workload: Workload, layout: Layout, target: Target, *, run_steps: int = 3,
                 peak_flops: float | None = None) -> dict[str, Any]:
    """Compile (and on `local` run) one layout; a layout that cannot work is a row with a status, not an error."""
    row: dict[str, Any] = {"layout": layout.name, "layout_spec": dataclasses.asdict(layout), "target": target.name,
                           "devices": target.num_devices, "chips": target.num_chips, "step": workload.step}
    try:
        built = build_step(workload, layout, target)
    except (MeshError, ValueError) as e:
        return {**row, "status": "invalid", "message": str(e)}
    mesh = {a: int(s) for a, s in built["mesh"].shape.items()}
    # Label by the resolved sizes (-1 filled in), so rows of different targets read alike.
    row.update(layout=dataclasses.replace(layout, mesh=tuple(mesh.items())).name, global_batch=built["global_batch"],
               tokens=built["tokens"], mesh=mesh)
    state = built["state"]
    row["param_bytes"] = _sharded_bytes(state.params)
    row["opt_bytes"] = _sharded_bytes(state.opt_state)
    row["ema_bytes"] = _sharded_bytes(state.ema_params) if state.ema_params is not None else 0.0
    row["param_bytes_replicated"] = _full_bytes(state.params)
    row["opt_bytes_replicated"] = _full_bytes(state.opt_state)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(built["mesh"]), nn.logical_axis_rules(built["rules"]):
            compiled = built["fn"].lower(*built["args"]).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's verdict on this layout is the result
        msg = str(e)
        oom = parse_oom(msg)
        row["compile_s"] = time.perf_counter() - t0
        if oom is not None:
            return {**row, "status": "oom", **oom, "message": msg.strip().splitlines()[0][:300]}
        return {**row, "status": "error", "message": f"{type(e).__name__}: {msg.strip().splitlines()[0][:300] if msg.strip() else ''}"}
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    row.update(
        status="ok",
        argument_bytes=float(mem.argument_size_in_bytes), output_bytes=float(mem.output_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes), temp_bytes=float(mem.temp_size_in_bytes),
        code_bytes=float(mem.generated_code_size_in_bytes),
    )
    # CPU's peak is not meaningful (DESIGN section 5): use live arguments + outputs + temporaries there.
    peak = getattr(mem, "peak_memory_in_bytes", 0) if target.kind == "tpu" else 0
    row["peak_bytes"] = float(peak or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes))
    hbm = target.chip.hbm_bytes / target.chip.devices_per_chip
    row["hbm_bytes"] = hbm
    row["fits"] = bool(not hbm or row["peak_bytes"] <= hbm)
    row["flops"] = float(cost.get("flops", 0.0))
    row["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    row["model_flops"] = built["model_flops"] / target.num_devices
    slices = [int(getattr(d, "slice_index", 0) or 0) for d in built["mesh"].devices.flat]
    hlo = compiled.as_text()
    stats = collective_stats(hlo, slices)
    row["collectives"] = stats.to_json()
    # Pallas TPU kernels (splash attention) in the program: XLA's cost analysis does not see inside them.
    row["mosaic_calls"] = hlo.count('custom_call_target="tpu_custom_call"')
    if target.kind == "local" and target.chip.name == "cpu" and peak_flops is None:
        peak_flops = _measure_cpu_peak() * target.num_devices
    row["roofline"] = row_roofline(
        row, target.chip, None if peak_flops is None else peak_flops / target.num_devices * target.chip.devices_per_chip)
    if target.kind == "local" and run_steps > 0:
        built["compiled"] = compiled
        measured = _run_locally(built, workload, run_steps)
        per_device_peak = (peak_flops or target.chip.peak_flops * target.num_chips) / target.num_devices
        row["measured"] = {**measured, "mfu": row["model_flops"] / measured["step_s"] / per_device_peak if per_device_peak else None}
    return row


def bench_sharding(workload: Workload, layouts: list[Layout], target: Target, on_row=None, **kw) -> list[dict[str, Any]]:
    """One row per layout (see bench_layout); on_row(rows) after each, so long sweeps can save as they go."""
    rows: list[dict[str, Any]] = []
    for layout in layouts:
        rows.append(bench_layout(workload, layout, target, **kw))
        if on_row is not None:
            on_row(rows)
    return rows


def workload_from(config_spec: str, overrides: list[str], video: str | None, text_len: int | None,
                  dtype: str | None, step: str, target: Target) -> Workload:
    """The Workload of a config name/file plus --config.* overrides and the benchmark's video/text size."""
    from sora_jax.config_overrides import apply_overrides, load_config

    config = apply_overrides(load_config(config_spec), overrides)
    if config.get("kind") != "dit":
        raise ValueError(f"--config {config_spec!r} is not a DiT config; use e.g. dit:variant=wan2.1-14b")
    if step not in STEPS:
        raise ValueError(f"--step {step!r}: choose one of {list(STEPS)}")
    frames, height, width = parse_video(video) if video else (config.data.frames, config.data.size, config.data.size)
    # bfloat16 compute is what runs on TPUs; CPU targets keep float32 like the CPU training runs.
    dtype = dtype or ("bfloat16" if target.kind == "tpu" or target.chip.name != "cpu" else "float32")
    w = Workload(config, frames, height, width, int(text_len or config.text.max_length), dtype=dtype, step=step)
    w.latent_shape  # noqa: B018 - validates the video size now, with one clear line
    return w


def run_meta(workload: Workload, target: Target) -> dict[str, Any]:
    """What a results file needs to be read: model, video, target, chip figures, versions."""
    import platform

    return {"variant": workload.config.variant, "video": [workload.frames, workload.height, workload.width],
            "latent": list(workload.latent_shape), "text_len": workload.text_len, "dtype": workload.dtype,
            "step": workload.step, "target": target.name, "target_kind": target.kind,
            "num_devices": target.num_devices, "num_slices": target.num_slices,
            "chip": dataclasses.asdict(target.chip), "jax": jax.__version__, "host_cpus": os.cpu_count(),
            "python": platform.python_version()}
