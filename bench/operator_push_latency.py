"""How long from a PluginChain update until every selected sidecar runs it, with 1 and 10 sidecars.

Runs the real operator process against kmock's emulated Kubernetes API and real sidecar
processes (as in tests/operator), updates a PluginChain repeatedly, and times two moments per
update: every sidecar's ConfigService reports the new chain, and the PluginChain's status says
all sidecars applied. Prints median and max per sidecar count.

    .venv/bin/python bench/operator_push_latency.py [--sidecars 1 10] [--updates 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster
from tests.support.harness import BIN, Process, wait_until
from tests.support.sidecars import TOKEN, Sidecar, add_pods

LABELS = {"app": "bench-gateway"}


def spec(version: int) -> dict:
    patterns = ["forbidden", f"marker-{version}"]
    return {"selector": {"matchLabels": LABELS}, "plugins": [{"name": "content_filter", "config": {"banned_patterns": patterns}}]}


def runs_marker(sidecar: Sidecar, version: int) -> bool:
    for chain in sidecar.get().chain_set.chains:
        for plugin in chain.plugins:
            if f"marker-{version}" in plugin.config_json:
                return True
    return False


def measure(cluster: Cluster, workdir: Path, token_file: Path, count: int, updates: int) -> dict:
    namespace = f"bench{count}"
    sidecars = [Sidecar(f"s{count}-{i}", workdir, token_file).start() for i in range(count)]
    try:
        add_pods(cluster, namespace, sidecars, LABELS)
        cluster.create_chain(namespace, "guard", spec(0))
        wait_until(lambda: all(runs_marker(s, 0) for s in sidecars), timeout=30, what="first push")
        to_sidecars, to_status = [], []
        for version in range(1, updates + 1):
            started = time.perf_counter()
            cluster.update_chain(namespace, "guard", spec(version))
            wait_until(lambda: all(runs_marker(s, version) for s in sidecars), timeout=30, what="update pushed")
            to_sidecars.append(time.perf_counter() - started)

            def status_done() -> bool:
                status = cluster.get_chain(namespace, "guard").get("status") or {}
                return status.get("observedGeneration") == version + 1 and status.get("sidecars") == f"{count}/{count}"

            wait_until(status_done, timeout=30, what="status written")
            to_status.append(time.perf_counter() - started)
        return {"sidecars": count, "to_sidecars": to_sidecars, "to_status": to_status}
    finally:
        for sidecar in sidecars:
            sidecar.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecars", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pluginchain-bench-") as tmp:
        workdir = Path(tmp)
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        cluster = Cluster().start()
        operator = Process("operator", [str(BIN / "pluginchain"), "operator", "--all-namespaces",
                                        "--token-file", str(token_file), "--log-level", "warning"],
                           workdir, env={"KUBECONFIG": str(cluster.kubeconfig(workdir / "kubeconfig"))})
        try:
            time.sleep(2)
            results = [measure(cluster, workdir, token_file, count, args.updates) for count in args.sidecars]
        finally:
            operator.stop()
            cluster.stop()
    print(f"{'sidecars':>8}  {'to all sidecars: median':>24}  {'max':>8}  {'to status: median':>18}  {'max':>8}")
    for result in results:
        s, t = result["to_sidecars"], result["to_status"]
        print(f"{result['sidecars']:>8}  {statistics.median(s) * 1000:>21.0f} ms  {max(s) * 1000:>5.0f} ms"
              f"  {statistics.median(t) * 1000:>15.0f} ms  {max(t) * 1000:>5.0f} ms")


if __name__ == "__main__":
    main()
