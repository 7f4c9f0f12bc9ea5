"""CUDA graphs (XLA command buffers) around the decode: a jitted multi-layer DeepSeek-style
step must run with command buffers enabled for custom calls and give the same logits.

    python3 benchmarks/command_buffer_check.py            # GPU; runs itself twice

The parent runs the step twice in child processes: with command buffers off
(`--xla_gpu_enable_command_buffer=`) and with XLA's default command types (CUSTOM_CALL among
them) and no minimum graph size. XLA decides command buffers on the thunk sequence after
compilation (its CommandBufferConversionPass), not in the HLO, so the "on" child dumps that
sequence (`--xla_dump_to`) and counts our custom-call thunks nested under a kCommandBuffer
thunk. Both print their logits' checksum; the parent compares them and the per-step time.
"""

import glob
import os
import re
import subprocess
import tempfile
import sys
import time

GRAPHS_ON = "--xla_gpu_graph_min_graph_size=1"
GRAPHS_OFF = "--xla_gpu_enable_command_buffer="


def custom_calls_in_command_buffers(dump_dir):
    """(inside, outside): custom-call thunks nested under a command-buffer thunk, and the rest,
    read from the thunk sequences XLA dumps after its thunk passes (indentation is nesting)."""
    inside = outside = 0
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt")):
        stack = []  # (indent, kind) of the enclosing thunks
        for line in open(path):
            kind = re.search(r"\bk[A-Z]\w+", line)
            if not kind:
                continue
            indent = len(line) - len(line.lstrip())
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if kind.group() == "kCustomCall":
                if any(k == "kCommandBuffer" for _, k in stack):
                    inside += 1
                else:
                    outside += 1
            stack.append((indent, kind.group()))
    return inside, outside


def run_step():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_flash_mla import cache as paged
    from jax_flash_mla.models import deepseek

    config = deepseek.Config(num_layers=4)
    params = deepseek.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, config.vocab_size, size=n)) for n in (40, 7, 120, 64)]
    cache = paged.init_cache(config.num_layers, 64, 16, 4, 16, config.latent_dim, jnp.bfloat16)
    cache, logits = deepseek.prefill(params, cache, prompts, config)
    active = jnp.ones((4,), bool)
    step = jax.jit(lambda cache, tokens: deepseek.decode_step(params, cache, tokens, active,
                                                              config), donate_argnums=0)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step.lower(cache, tokens).compile()
    times, checksum = [], 0.0
    for _ in range(8):
        start = time.perf_counter()
        cache, logits, ok = step(cache, tokens)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        checksum += float(jnp.sum(jnp.abs(logits)))
    dump_dir = os.environ.get("COMMAND_BUFFER_DUMP")
    inside, outside = custom_calls_in_command_buffers(dump_dir) if dump_dir else (0, 0)
    print(f"checksum {checksum:.6f} ok {bool(jnp.all(ok))} custom_calls_in_command_buffers {inside} "
          f"custom_calls_outside {outside} "
          f"step_ms {sorted(times)[len(times) // 2] * 1e3:.3f}", flush=True)


def main():
    if os.environ.get("COMMAND_BUFFER_CHILD"):
        run_step()
        return 0
    results = {}
    dump_dir = tempfile.mkdtemp(prefix="thunks_")
    for name, flags in (("off", GRAPHS_OFF), ("on", f"{GRAPHS_ON} --xla_dump_to={dump_dir}")):
        env = dict(os.environ, COMMAND_BUFFER_CHILD="1", COMMAND_BUFFER_DUMP=dump_dir,
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        line = subprocess.run([sys.executable, __file__], env=env, check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[name] = dict(zip(line.split()[::2], line.split()[1::2]))
        print(f"command buffers {name}: {line}")
    same = abs(float(results["on"]["checksum"]) - float(results["off"]["checksum"])) <= 1e-3 * abs(
        float(results["off"]["checksum"]))
    graphs = int(results["on"]["custom_calls_in_command_buffers"]) > 0
    for path in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt"))):
        lines = open(path).readlines()
        if any("kCustomCall" in line for line in lines):
            print(f"--- {os.path.basename(path)}")
            print("".join(lines[:40]), end="")
    print("logits match:", same, "| decode inside a command buffer:", graphs)
    return 0 if same and graphs else 1


if __name__ == "__main__":
    raise SystemExit(main())
