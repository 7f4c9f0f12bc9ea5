"""CUDA graphs (XLA command buffers) around the decode: a jitted multi-layer DeepSeek-style
step must run with command buffers enabled for custom calls and give the same logits.

    python3 benchmarks/command_buffer_check.py            # GPU; runs itself twice

The parent runs the step with command buffers off (`--xla_gpu_enable_command_buffer=`), the
child with FUSION and CUSTOM_CALL commands and no minimum graph size; the child also checks
that the optimized HLO wraps our custom calls in a command buffer. Both print their logits'
checksum, the parent compares them and the per-step time.
"""

import os
import re
import subprocess
import sys
import time

GRAPHS_ON = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
GRAPHS_OFF = "--xla_gpu_enable_command_buffer="


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
    hlo = step.lower(cache, tokens).compile().as_text()
    times, checksum = [], 0.0
    for _ in range(8):
        start = time.perf_counter()
        cache, logits, ok = step(cache, tokens)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        checksum += float(jnp.sum(jnp.abs(logits)))
    # Source locations (this file's own name among them, in the metadata and in the file-name
    # table after the computations) are not instructions.
    hlo = re.sub(r"metadata=\{[^}]*\}", "", hlo.split("\nFileNames")[0])
    # XLA's command-buffer pass moves the commands into computations it names command_buffer.
    wrapped = "command_buffer" in hlo and "jax_flash_mla_decode" in hlo
    print(f"checksum {checksum:.6f} ok {bool(jnp.all(ok))} command_buffer_in_hlo {wrapped} "
          f"step_ms {sorted(times)[len(times) // 2] * 1e3:.3f}", flush=True)


def main():
    if os.environ.get("COMMAND_BUFFER_CHILD"):
        run_step()
        return 0
    results = {}
    for name, flags in (("off", GRAPHS_OFF), ("on", GRAPHS_ON)):
        env = dict(os.environ, COMMAND_BUFFER_CHILD="1",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        line = subprocess.run([sys.executable, __file__], env=env, check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[name] = dict(zip(line.split()[::2], line.split()[1::2]))
        print(f"command buffers {name}: {line}")
    same = abs(float(results["on"]["checksum"]) - float(results["off"]["checksum"])) <= 1e-3 * abs(
        float(results["off"]["checksum"]))
    graphs = results["on"]["command_buffer_in_hlo"] == "True"
    print("logits match:", same, "| decode inside a command buffer:", graphs)
    return 0 if same and graphs else 1


if __name__ == "__main__":
    raise SystemExit(main())
