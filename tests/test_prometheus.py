"""The alert rules (charts/alignd/rules/alignd.rules.yaml) and the Grafana
dashboard (charts/alignd/dashboards/alignd.json) against real Prometheus tools.

promtool and prometheus are Debian's 2.42.0 binaries that `make setup` unpacks
into $VENV/tools/prometheus (no root needed). Fast tests: `promtool check
rules`, `promtool test rules` (alignd.rules.test.yaml makes every alert fire
and stay silent), and the chart's PrometheusRule is the same file. The slow
test scrapes the local stack during a short PPO run with a real Prometheus and
evaluates every dashboard expression and every rule's underlying vectors.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "alignd"
RULES = CHART / "rules" / "alignd.rules.yaml"
RULE_TESTS = CHART / "rules" / "alignd.rules.test.yaml"
DASHBOARD = CHART / "dashboards" / "alignd.json"
ROLES = ("policy", "reward", "reference", "learner", "coordinator")
# Values the chart's thresholds default to, and the literals the rules file holds for them.
CHART_THRESHOLDS = {  # alert: (literal in the file, values key, a non-default value, its literal)
    "AligndRunStalled": ("[30m]", "stalledRunWindow", "45m", "[45m]"),
    "AligndKLBlowUp": ("} > 1 and", "klThreshold", 0.3, "} > 0.3 and"),
    "AligndRewardErrors": ("> 0.05", "errorRatioThreshold", 0.2, "> 0.2"),
    "AligndGrpcErrors": ("> 0.05", "errorRatioThreshold", 0.2, "> 0.2"),
}


def prometheus_tool(name: str) -> Path:
    """$VENV/tools/prometheus/usr/bin/NAME, unpacked by `make setup` (Makefile)."""
    for venv in (Path(sys.prefix), ROOT / ".venv"):
        path = venv / "tools" / "prometheus" / "usr" / "bin" / name
        if path.is_file():
            return path
    pytest.fail(
        f"{name} not found under {Path(sys.prefix) / 'tools' / 'prometheus' / 'usr' / 'bin'}: run `make setup` "
        "(it fetches Debian's prometheus package with `apt-get download` and unpacks it there)"
    )


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(prometheus_tool("promtool")), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


# -- PromQL: the vectors under an alert's condition -------------------------------------

_OPEN, _CLOSE = "([{", ")]}"
_SET_OPS = ("and", "or", "unless")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?(e[+-]?\d+)?|\.\d+|inf|nan)$", re.I)


def _depth_map(expr: str) -> list[int]:
    """Nesting depth (brackets of any kind, and quotes) of each character of `expr`."""
    depths, depth, quote = [], 0, None
    for i, ch in enumerate(expr):
        if quote:
            depths.append(depth + 1)
            if ch == quote and expr[i - 1] != "\\":
                quote = None
            continue
        if ch in "\"'`":
            quote = ch
            depths.append(depth + 1)
        elif ch in _OPEN:
            depth += 1
            depths.append(depth)
        elif ch in _CLOSE:
            depths.append(depth)
            depth -= 1
        else:
            depths.append(depth)
    return depths


def _strip(expr: str) -> str:
    """Whitespace, a leading vector-matching modifier, and parentheses around the whole expression."""
    expr = expr.strip()
    expr = re.sub(r"^(on|ignoring)\s*\([^)]*\)\s*((group_left|group_right)\s*(\([^)]*\))?)?\s*", "", expr)
    while expr.startswith("(") and expr.endswith(")") and 0 not in _depth_map(expr)[:-1]:
        expr = expr[1:-1].strip()
    return expr


def _split_top(expr: str, ops: tuple[str, ...], words: bool) -> list[str]:
    """Splits `expr` at binary operators `ops` outside any bracket or string."""
    depths, parts, start, i = _depth_map(expr), [], 0, 0
    while i < len(expr):
        if depths[i] == 0:
            for op in ops:
                if not expr.startswith(op, i):
                    continue
                if words and (
                    re.match(r"\w", expr[i - 1 : i] or " ")
                    or re.match(r"\w", expr[i + len(op) : i + len(op) + 1] or " ")
                ):
                    continue
                if not words and expr[i + len(op) : i + len(op) + 1] in ("=", "~"):  # `=~` never occurs at depth 0
                    continue
                parts.append(expr[start:i])
                start = i = i + len(op)
                break
            else:
                i += 1
        else:
            i += 1
    parts.append(expr[start:])
    return parts


def underlying_vectors(expr: str) -> list[str]:
    """The vectors an alert's condition is made of: split at top-level `and`/`or`/`unless`,
    then each operand split at its top-level comparison, dropping number literals.

    An alert expression that must not fire is empty; these must not be: each
    one selecting nothing would mean a wrong metric name or label, and the
    alert could never fire."""
    out = []
    for operand in _split_top(expr, _SET_OPS, words=True):
        for side in _split_top(_strip(operand), _COMPARISONS, words=False):
            side = _strip(re.sub(r"^bool\s+", "", side.strip()))
            if side and not _NUMBER.match(side):
                out.append(side)
    return out


def test_underlying_vectors_of_compound_conditions():
    assert underlying_vectors('up{job=~"a|b"} == 0') == ['up{job=~"a|b"}']
    assert underlying_vectors('x{a!="1"} unless abs(x) < Inf') == ['x{a!="1"}', "abs(x)"]
    assert underlying_vectors("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.05") == ["sum(rate(a[5m])) / sum(rate(b[5m]))"]
    assert underlying_vectors(
        "(time() - max(t)) and on(namespace) (sum(increase(s[30m])) == 0) unless on(namespace) (e >= max(t or u))"
    ) == ["time() - max(t)", "sum(increase(s[30m]))", "e", "max(t or u)"]


# -- promtool -------------------------------------------------------------------------


def test_promtool_check_rules():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in out.stdout


def test_promtool_rule_unit_tests_pass():
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_firing_and_silent():
    alerts = {r["alert"] for r in load_rules()}
    fired, silent = set(), set()
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert alerts <= fired, f"alerts never shown to fire: {alerts - fired}"
    assert alerts <= silent, f"alerts never shown to stay silent: {alerts - silent}"


def test_rules_document_themselves():
    for r in load_rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert re.fullmatch(r"[0-9]+[smh]", r["for"]), r["alert"]
        # Series are selected by role (`job`) only: the chart confines `job=` to the release.
        assert (
            "job=" in r["expr"]
            and "namespace=" not in r["expr"]
            and "service=" not in r["expr"].replace("grpc_service", "")
        ), r["alert"]


# -- the chart's PrometheusRule is this file ----------------------------------------------


def _render_rules(values: dict) -> list[dict]:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render(copy.deepcopy(values), name="rel", namespace="ml")
    finally:
        chart.close()
    (doc,) = [d for p, text in out.items() if p.endswith("prometheusrule.yaml") for d in yaml.safe_load_all(text) if d]
    return doc["spec"]["groups"]


def test_chart_prometheusrule_is_the_rules_file(tmp_path):
    services = "policy-headless|reward-headless|reference-headless|learner-headless|coordinator"
    scope = f'namespace="ml", service=~"rel-alignd-({services})", job='
    file_groups = yaml.safe_load(RULES.read_text())["groups"]
    enabled = {"metrics": {"prometheusRule": {"enabled": True}}}

    groups = _render_rules(enabled)
    assert [g["name"] for g in groups] == [f"{g['name']}.rel-alignd" for g in file_groups]
    for file_group, group in zip(file_groups, groups):
        assert len(group["rules"]) == len(file_group["rules"])
        for want, got in zip(file_group["rules"], group["rules"]):
            # Default values: the file's rules, each selector confined to the release.
            assert got == {**want, "expr": want["expr"].replace("job=", scope)}, want["alert"]
    # What the chart renders is a valid rules file too.
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump({"groups": groups}))
    out = promtool("check", "rules", str(tmp_path / "rendered.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr

    # Non-default thresholds replace exactly the literals that hold the defaults.
    values = copy.deepcopy(enabled)
    for _, key, value, _ in CHART_THRESHOLDS.values():
        values["metrics"]["prometheusRule"][key] = value
    rendered = {r["alert"]: r["expr"] for g in _render_rules(values) for r in g["rules"]}
    for r in load_rules():
        expr = r["expr"]
        if r["alert"] in CHART_THRESHOLDS:
            default, _, _, literal = CHART_THRESHOLDS[r["alert"]]
            assert expr.count(default) == 1, r["alert"]
            expr = expr.replace(default, literal)
        assert rendered[r["alert"]] == expr.replace("job=", scope), r["alert"]


def test_chart_threshold_defaults_are_the_files():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]
    assert f"[{values['stalledRunWindow']}]" == CHART_THRESHOLDS["AligndRunStalled"][0]
    assert f"}} > {values['klThreshold']:g} and" == CHART_THRESHOLDS["AligndKLBlowUp"][0]
    assert f"> {values['errorRatioThreshold']:g}" == CHART_THRESHOLDS["AligndRewardErrors"][0]


# -- a real Prometheus scraping the local stack -------------------------------------------

NAMESPACE = "alignd-test"
HEADLESS = dict.fromkeys(("policy", "reward", "reference", "learner"), "-headless")
RELEASE = "rel-alignd"  # the Services' name prefix, as the chart's ServiceMonitor labels targets (`service`)
RUN_STEPS = 3
# Grafana's variables, as a dashboard at a 1 s scrape interval would fill them in.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "5m",
    "${namespace}": NAMESPACE,
    "$namespace": NAMESPACE,
    "$release": RELEASE,
}
DEADLINE_S = 240.0


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            out.extend((p.get("title", ""), t["expr"]) for t in p.get("targets", []) if t.get("expr"))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def fill_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None


def _running(proc: subprocess.Popen, log: Path):
    """wait_until's `alive` check: fails the test when Prometheus has exited."""

    def check() -> None:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

    return check


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def write_prometheus_config(path: Path, stack: dict) -> None:
    """One scrape job per role named after it (as the chart's ServiceMonitor does), every
    target labelled with a namespace (the dashboard's $namespace)."""
    jobs = []
    for role in ROLES:
        url = urllib.parse.urlparse(stack["services"][role]["metrics_url"])
        jobs.append(
            {
                "job_name": role,
                "metrics_path": url.path,
                "static_configs": [
                    {
                        "targets": [url.netloc],
                        "labels": {"namespace": NAMESPACE, "service": f"{RELEASE}-{role}{HEADLESS.get(role, '')}"},
                    }
                ],
            }
        )
    path.write_text(
        yaml.safe_dump(
            {
                # Rules are evaluated too (every 5 s; `[1d:]` subqueries resolve at this interval).
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "5s"},
                "rule_files": [str(RULES)],
                "scrape_configs": jobs,
            }
        )
    )


def _provoke_errors(stack: dict) -> None:
    """One rejected call on the reward service and one on another role: the error
    ratios, and the dashboard's errors panel, have a numerator to select."""
    import grpc

    from alignd.runtime.client import make_channel
    from alignd.runtime.tokens import operator_credentials
    from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc, reward_pb2, reward_pb2_grpc

    creds = operator_credentials(stack["auth"]["tokens_file"])
    with make_channel(stack["services"]["reward"]["address"], credentials=creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(items=[]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with make_channel(stack["services"]["coordinator"]["address"], credentials=creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            coordinator_pb2_grpc.CoordinatorServiceStub(ch).StartRun(
                coordinator_pb2.StartRunRequest(run_id="Bad Id!", config_yaml="steps: 1"), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_dashboard_and_rules_return_data_from_a_ppo_run(tmp_path, monkeypatch):

    from alignd.local_stack import LocalStack, default_stack_config
    from alignd.runtime.client import make_channel
    from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc

    prometheus = prometheus_tool("prometheus")
    monkeypatch.setenv("ALIGND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    deadline = t0 + DEADLINE_S
    stack = LocalStack(default_stack_config(), tmp_path / "stack")
    prom, prom_log = None, tmp_path / "prometheus.log"
    timings = {}
    try:
        info = stack.start()
        timings["stack_ready"] = time.monotonic() - t0
        write_prometheus_config(tmp_path / "prometheus.yml", info)
        out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
        assert out.returncode == 0, out.stdout + out.stderr
        port = free_port()
        with open(prom_log, "wb") as log:
            prom = subprocess.Popen(
                [
                    str(prometheus),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        api = PromAPI(f"http://127.0.0.1:{port}")

        def ready():
            try:
                with urllib.request.urlopen(f"{api.base}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until("prometheus ready", ready, _left(deadline), 0.25, alive=_running(prom, prom_log))
        # Every role scraped before the run starts: counters are seen rising, not born at their final value.
        wait_until(
            "up == 1 for every role",
            lambda: sorted(r["metric"]["job"] for r in api.query("up == 1")) == sorted(ROLES),
            _left(deadline),
            0.25,
            alive=_running(prom, prom_log),
        )
        timings["scraping"] = time.monotonic() - t0

        # A short PPO run through the coordinator, and two rejected calls.
        run_cfg = yaml.safe_dump(
            {
                "steps": RUN_STEPS,
                "prompts_per_step": 8,
                "prompts": {"path": str(ROOT / "configs" / "tiny_prompts.txt")},
                "sampling": {"max_new_tokens": 8, "ignore_eos": True},
                "seed": 1,
            }
        )
        with make_channel(info["services"]["coordinator"]["address"], credentials=stack.operator_credentials()) as ch:
            coord = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            coord.StartRun(coordinator_pb2.StartRunRequest(run_id="prom", config_yaml=run_cfg), timeout=60)
            _provoke_errors(info)

            def run_ended():
                run = coord.GetRun(coordinator_pb2.GetRunRequest(run_id="prom"), timeout=30).run
                return run if run.state != coordinator_pb2.RUN_STATE_RUNNING else None

            run = wait_until("the PPO run to end", run_ended, _left(deadline), 0.25)
        assert run.state == coordinator_pb2.RUN_STATE_SUCCEEDED, run.error
        timings["run_done"] = time.monotonic() - t0

        # Prometheus has scraped the steps and the run's end.
        wait_until(
            f"{RUN_STEPS} steps and the run's end scraped",
            lambda: (
                api.value("sum(alignd_coordinator_steps_total)") == RUN_STEPS
                and api.value('sum(alignd_coordinator_runs_total{state="succeeded"})') == 1
            ),
            _left(deadline),
            0.25,
            alive=_running(prom, prom_log),
        )
        timings["scraped"] = time.monotonic() - t0
        assert api.value("sum(rate(alignd_coordinator_steps_total[1m]))") > 0  # the counter was seen rising

        # Every dashboard expression returns data, except the GPU-memory one: a CPU run exports no
        # alignd_<role>_gpu_memory_allocated_bytes (its model-memory neighbour must return data).
        exprs = dashboard_exprs()
        gpu_only = [(t, e) for t, e in exprs if "gpu_memory_allocated_bytes" in e]
        assert len(gpu_only) == 1, gpu_only
        exprs = [x for x in exprs if x not in gpu_only]
        assert len(exprs) >= 15
        # A series born during the run (a label value's first use) needs a second sample for rate():
        # poll a few scrapes for that, no longer.
        settle = time.monotonic() + 15
        while True:
            empty = [(title, fill_vars(e)) for title, e in exprs if not api.query(fill_vars(e))]
            if not empty or time.monotonic() > settle:
                break
            time.sleep(0.5)  # polling a condition
        timings["dashboard"] = time.monotonic() - t0
        if empty:  # what was scraped of the metrics they use
            names = sorted(set(re.findall(r"\b((?:alignd|grpc_server)_[a-z0-9_]+)", " ".join(e for _, e in empty))))
            seen = {n: api.query(f"count_over_time({n}[5m])") for n in names}
            pytest.fail(
                "dashboard expressions without data:\n"
                + "\n".join(f"  {t}: {e}" for t, e in empty)
                + "\nscraped samples:\n"
                + json.dumps(seen, indent=1)
            )
        namespaces = api.get("/api/v1/label/namespace/values", **{"match[]": "grpc_server_started_total"})
        assert namespaces == [NAMESPACE]  # the dashboard's $namespace variable

        # Every rule: each vector under its condition selects data. The run-stall
        # rule's last-step subquery resolves at the evaluation interval (5 s): poll.
        for rule in load_rules():
            for vec in underlying_vectors(rule["expr"]):
                if rule["alert"] == "AligndRewardErrors" and 'code=~"INTERNAL' in vec:
                    # The reward APIs' server-side failures: a healthy stack has none. The caller's error
                    # _provoke_errors made is counted in the requests, and not here (no alert for callers' errors).
                    wait_until(
                        "the provoked INVALID_ARGUMENT in alignd_reward_requests_total",
                        lambda: api.query('alignd_reward_requests_total{job="reward", code="INVALID_ARGUMENT"}'),
                        _left(deadline),
                        0.25,
                        alive=_running(prom, prom_log),
                    )
                    assert api.query(vec) == [], vec
                    continue
                wait_until(
                    f"{rule['alert']}: data for {vec}",
                    lambda v=vec: api.query(v),
                    _left(deadline),
                    0.25,
                    alive=_running(prom, prom_log),
                )
        # A healthy run: these alerts' conditions hold for nothing.
        for rule in load_rules():
            if rule["alert"] in ("AligndRunStalled", "AligndNaNLoss", "AligndSkippedUpdates", "AligndServiceDown"):
                assert api.query(rule["expr"]) == [], rule["alert"]

        # Prometheus evaluates every rule of the file without an error.
        def rules_evaluated():
            groups = api.get("/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if len(rules) != len(load_rules()) or any(r["lastEvaluation"].startswith("0001") for r in rules):
                return None
            return rules

        for r in wait_until(
            "every rule evaluated", rules_evaluated, _left(deadline), 0.25, alive=_running(prom, prom_log)
        ):
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
        timings["checked"] = time.monotonic() - t0
    finally:
        print("timings (s from start):", {k: round(v, 1) for k, v in timings.items()})
        if prom is not None and prom.poll() is None:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        stack.stop()
