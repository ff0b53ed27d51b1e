"""deploy/: what CI can check without a Docker engine (none runs on the development
machines or in CI), plus the fleet-side promises the deployment relies on.

Static checks (no processes):
  * the compose file: `docker-compose -f deploy/docker-compose.yml config` when a
    docker-compose (or `docker compose`) binary exists; always, with PyYAML, its
    structure: every service has a health check and a restart policy, Consul is
    the official hashicorp/consul image as one server agent, every rtm service
    points CONSUL_HTTP_ADDR and RTM_CONSUL at it, binds 0.0.0.0 and advertises its
    own service name (replicated services: their container hostname), the fleet
    has the processes the issue asks for, and every rtm command line parses with
    that command's own flag parser;
  * the Dockerfile: slim Python base, non-root user, uvloop, entry point `rtm`,
    every package copied;
  * envoy.yaml: Envoy's v3 API (field names and types), TLS on the edge listener, `/api/` to the webapp, and for
    every gateway a websocket-upgrade route matching the --public-url it advertises;
  * prometheus.yml: Consul SD on the consul service naming every registered service,
    the metrics_port meta relabelled into the scrape address (and promtool, when
    installed, checks the rest of the file);
  * Grafana provisioning: the datasource uid the dashboard uses, the dashboard path
    the compose file mounts; every query names an rtm_ or process_ metric, and the per-process
    panels group by labels Prometheus' relabelling gives every rtm target;
  * gen-cert.sh makes a certificate openssl accepts, the shared secret, one Consul token per
    service, the Consul management and agent tokens and Grafana's password, in a 0600 .env;
  * the internal wire's mutual TLS: every rtm process in compose (and the on-demand operator)
    has RTM_TLS_CA/CERT/KEY pointing at read-only mounts of files gen-cert.sh makes, only its
    own certificate and key, named by its --instance-id; no identity-bearing service is
    replicated; the webapp's internal listener is published nowhere and never routed; and
    gen-cert.sh, run for real, makes certificates that services/tls.py loads for exactly that
    process, that complete a mutual TLS handshake under the CA, 0600 and owned by the
    containers' uid (or 0640 to the operator's group), kept on a rerun, new after a rotation;
  * Consul ACLs: default deny, the management token from .env, one policy per service
    (deploy/consul/policies/*.hcl) that lets it write only its own registrations; only CHARM
    writes the rings, only the operator the drained-regions keys; each rtm container gets
    only its own token; Prometheus reads Consul with its own.

Running fleet (`rtm up --host 127.0.1.2 --port-base <random>`; 127.0.0.0/8 is all
loopback on Linux), with JSON logs at DEBUG:
  * nothing assumes 127.0.0.1: a posted message reaches a websocket client, and every
    address in fleet.json, in rtm.connect's URL and in Consul is 127.0.1.2;
  * every metric the Grafana dashboard queries is exposed by some process's /metrics, and each
    `process_*` series of its per-process panels (CPU, RSS, open fds) by every process;
  * Prometheus' relabelling, applied to what Consul really holds, yields a scrape
    address serving /metrics for every registered process;
  * one message can be followed across processes by its `eid` in the JSON logs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rtmctl.cli import COMMANDS
from services.certs import identity_of
from services.identity import OPERATOR, PeerIdentity
from services.tls import (
    WIRE_TLS_ON,
    TrustConfigError,
    client_context,
    identity_from_peercert,
    server_context,
    trust_from_args,
)
from tests.support import async_wait_until, free_port_base
from tests.system.harness import Fleet, consul_client

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENVOY = DEPLOY / "envoy.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
POLICIES = DEPLOY / "consul" / "policies"
ACL_INIT = DEPLOY / "consul" / "acl-init.sh"
GEN_CERT = DEPLOY / "gen-cert.sh"
# What gen-cert.sh generates into deploy/.env, and compose requires (${VAR:?...}).
TOKEN_SERVICES = ("WEBAPP", "ADMIN_SERVER", "CHANNEL_SERVER", "PRESENCE", "CHARM", "GATEWAY", "OPERATOR", "PROMETHEUS")
ENV_VARS = (
    "RTM_SECRET",
    "CONSUL_MANAGEMENT_TOKEN",
    "CONSUL_AGENT_TOKEN",
    *(f"RTM_CONSUL_TOKEN_{s}" for s in TOKEN_SERVICES),
    "GRAFANA_ADMIN_PASSWORD",
    "RTM_EDGE_UID",
    "RTM_EDGE_GID",
    "RTM_TLS_GID",
)
# The containers' user (deploy/Dockerfile: useradd --uid 10001); the TLS files are theirs.
CONTAINER_UID = 10001
TLS_MOUNT_DIR = "/etc/rtm/tls"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# One rule per line: `<resource> "<name>" { policy = "<level>" }` (the subset of Consul's HCL the files use).
RULE_RE = re.compile(r'^(\w+) "([^"]*)" \{ policy = "(read|write|deny|list)" \}$')
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rtm.json"
# Not the default 127.0.0.1, and loopback without any setup (all of 127.0.0.0/8 is, on
# Linux); not 127.0.0.x either, which bench/connections.py uses as client source addresses.
ELSEWHERE = "127.0.1.2"
# The Consul service names the processes register under (each app's SERVICE).
SERVICE_MODULES = (
    "webapp_stub.app",
    "admin_server.app",
    "channel_server.app",
    "gateway.app",
    "charm.app",
    "presence.app",
)


def registered_names() -> set[str]:
    return {importlib.import_module(m).SERVICE for m in SERVICE_MODULES}


class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping with a key twice (YAML forbids it; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [
            key.value
            for key, _ in node.value
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge"
        ]
        duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def test_yaml_loader_refuses_duplicate_keys() -> None:
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a:\n  b: 1\n  b: 2\n", Loader=StrictLoader)  # noqa: S506


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?err} with the defaults (what `config` shows with an empty env)."""
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def rtm_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if (svc.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"
    }


def rtm_argvs(svc: dict[str, Any]) -> list[list[str]]:
    """The `rtm ...` command lines a service runs (its command, or each `rtm` in its sh -c script)."""
    command = svc["command"]
    entry = svc.get("entrypoint")
    if entry and entry[0].endswith("sh"):
        argvs = []
        for part in re.split(r"&&|;", interpolate(" ".join(command))):
            words = [w for w in shlex.split(part) if not w.startswith(">")]
            if words and words[0] == "exec":
                words = words[1:]
            assert words and words[0] == "rtm", part
            argvs.append(words[1:])
        return argvs
    return [[interpolate(str(a)) for a in command]]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# -- (a) the compose file ----------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    """`docker-compose config` (Debian's docker-compose package, or the docker compose plugin) accepts it."""
    env = {**os.environ, **{name: f"ci-{name.lower()}" for name in ENV_VARS}}
    if shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", str(COMPOSE), "config", "-q"]
    elif (
        shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        cmd = ["docker", "compose", "-f", str(COMPOSE), "config", "-q"]
    else:
        pytest.skip("no docker-compose binary here: the structural checks below still run")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    # and it refuses to run without the shared secret rather than using a default one
    env.pop("RTM_SECRET")
    env["RTM_SECRET"] = ""
    assert subprocess.run(cmd, capture_output=True, env=env, timeout=60).returncode != 0


def test_compose_structure() -> None:
    """Health checks, restart policies, real Consul, addresses, and the fleet's shape."""
    doc = compose()
    services = doc["services"]
    one_shot = {
        dep
        for svc in services.values()
        for dep, cond in (svc.get("depends_on") or {}).items()
        if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"
    }
    assert one_shot == {"consul-acl-init"}, one_shot
    on_demand = {name for name, svc in services.items() if svc.get("profiles")}
    assert on_demand == {"operator"}, on_demand  # `docker compose run --rm operator ...`, never started by `up`
    for name, svc in services.items():
        if name in on_demand:
            continue
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name}: no restart policy"
        if name in one_shot:  # a job that runs to completion: what waits on it checks its exit code
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
    consuls = [
        n
        for n, s in services.items()
        if str(s.get("image", "")).startswith("hashicorp/consul:") and (s.get("command") or [""])[0] == "agent"
    ]
    assert consuls == ["consul"], consuls
    consul_cmd = services["consul"]["command"]
    assert consul_cmd[0] == "agent" and "-server" in consul_cmd and "-bootstrap-expect=1" in consul_cmd
    assert "-client=0.0.0.0" in consul_cmd

    rtm = rtm_services(doc)
    assert rtm, "no service built from deploy/Dockerfile"
    roles: dict[str, list[str]] = {}
    regions: set[str] = set()
    for name, svc in rtm.items():
        env = svc["environment"]
        assert env["CONSUL_HTTP_ADDR"] == env["RTM_CONSUL"] == "consul:8500", name
        assert svc["depends_on"]["consul"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["consul-acl-init"]["condition"] == "service_completed_successfully", name
        argv = rtm_argvs(svc)[-1]  # the long-running one
        command = argv[0]
        assert flag(argv, "--host") == "0.0.0.0", f"{name} must bind 0.0.0.0 in its container"
        assert flag(argv, "--advertise-host") == name, f"{name} must advertise its own service name"
        # one process per service: replicas would run under one certificate and one instance id
        assert "replicas" not in (svc.get("deploy") or {}) and "scale" not in svc, f"{name} is replicated"
        assert flag(argv, "--instance-id"), f"{name} needs an explicit --instance-id (its certificate's)"
        role = flag(argv, "--role") or "active"
        roles.setdefault(f"{command}/{role}", []).append(name)
        if command == "gateway":
            regions.add(str(flag(argv, "--region")))
            assert env.get("RTM_SECRET"), f"{name} needs the shared secret"
    assert len(roles["admin-server/active"]) == 2, roles
    assert len(roles["channel-server/active"]) == 3 and len(roles["channel-server/spare"]) == 1, roles
    assert len(roles["presence/active"]) == 2 and len(roles["presence/spare"]) == 1, roles
    assert len(roles["charm/active"]) == 2, roles
    assert len(roles["webapp/active"]) == 1, roles
    assert len(regions) >= 2, regions
    charm_slots = {
        (flag(a, "--channel-slots"), flag(a, "--presence-slots"))
        for s in rtm.values()
        for a in rtm_argvs(s)
        if a[0] == "charm"
    }
    assert charm_slots == {("3", "2")}, charm_slots

    webapp = rtm["webapp"]
    assert webapp["environment"].get("RTM_SECRET"), "the webapp needs the shared secret"
    data_dir = flag(rtm_argvs(webapp)[-1], "--data-dir")
    named = [v for v in webapp["volumes"] if isinstance(v, str)]
    assert any(v.split(":")[1] == data_dir for v in named), "the webapp's data dir must be a volume"
    assert webapp["volumes"][0].split(":")[0] in (doc.get("volumes") or {}), "a named volume"

    edge = next(s for s in services.values() if str(s.get("image", "")).startswith("envoyproxy/envoy:"))
    assert any(v.startswith("./envoy.yaml:") for v in edge["volumes"])
    assert any(v.startswith("./certs:/etc/envoy/certs") for v in edge["volumes"])
    prom = next(s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus:"))
    assert any(v.startswith("./prometheus.yml:") for v in prom["volumes"])
    graf = next(s for s in services.values() if str(s.get("image", "")).startswith("grafana/"))
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in graf["volumes"])
    assert any(v.startswith("./grafana/dashboards:/etc/grafana/dashboards") for v in graf["volumes"])


def test_every_rtm_command_line_parses() -> None:
    """Each service's `rtm <command> ...` is a real command whose parser accepts every flag given."""
    for name, svc in rtm_services(compose()).items():
        for argv in rtm_argvs(svc):
            assert argv[0] in COMMANDS, f"{name}: unknown rtm command {argv[0]}"
            module = importlib.import_module(COMMANDS[argv[0]][0])
            try:
                module.build_parser().parse_args(argv[1:])
            except SystemExit as exc:  # argparse's way of refusing a flag
                raise AssertionError(f"{name}: `rtm {' '.join(argv)}` does not parse") from exc


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(re.fullmatch(r"python:3\.(1[1-9])-slim", b) for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"pip install \. uvloop", text), "install the package with uvloop"
    assert re.search(r'^ENTRYPOINT \["rtm"\]', text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', pyproject.split("[tool.setuptools.packages.find]")[1])
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), f"{package} is not copied into the image"
    assert "HEALTHCHECK" in text


# -- (b) the edge ------------------------------------------------------------------------------


def edge_routes(doc: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    listener = next(listener for listener in doc["static_resources"]["listeners"] if listener["name"] == "edge_https")
    chain = listener["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    return chain, routes


def cluster_endpoint(doc: dict[str, Any], name: str) -> tuple[str, int]:
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == name)
    sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return str(sock["address"]), int(sock["port_value"])


def test_envoy_routes_for_the_webapp_and_every_gateway() -> None:
    doc = load_yaml(ENVOY)
    chain, routes = edge_routes(doc)
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("tls.v3.DownstreamTlsContext")
    cert = tls["common_tls_context"]["tls_certificates"][0]
    assert cert["certificate_chain"]["filename"] == "/etc/envoy/certs/edge.crt"
    assert cert["private_key"]["filename"] == "/etc/envoy/certs/edge.key"
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert all(r["route"]["cluster"] in clusters for r in routes)
    assert not any(r["match"].get("prefix", "").startswith("/internal") for r in routes), (
        "internal endpoints stay inside"
    )
    api = [r for r in routes if r["match"].get("prefix") == "/api/"]
    assert len(api) == 1 and not api[0]["route"].get("upgrade_configs")
    rtm = rtm_services(compose())
    assert cluster_endpoint(doc, api[0]["route"]["cluster"]) == (
        "webapp",
        int(flag(rtm_argvs(rtm["webapp"])[-1], "--port") or 0),
    )
    # the webapp's permalinks name the edge too (https where the gateways' links are wss)
    webapp_public = str(flag(rtm_argvs(rtm["webapp"])[-1], "--public-url"))
    assert webapp_public.startswith("https://"), f"permalinks must name the edge's TLS URL, not {webapp_public}"

    gateways = {name: rtm_argvs(svc)[-1] for name, svc in rtm.items() if rtm_argvs(svc)[-1][0] == "gateway"}
    assert gateways
    for name, argv in gateways.items():
        public = str(flag(argv, "--public-url"))
        assert public.startswith("wss://"), f"{name}: clients must get the edge's TLS URL, not {public}"
        path = "/" + public.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/"
        route = next((r for r in routes if r["match"].get("prefix") == path), None)
        assert route is not None, f"no edge route for {name}'s public URL {public}"
        assert route["route"].get("prefix_rewrite") == "/", "the gateway serves /ws/<ticket>"
        assert {"upgrade_type": "websocket"} in route["route"]["upgrade_configs"]
        assert route["route"].get("timeout") in ("0s", 0), "no response timeout on a websocket"
        assert cluster_endpoint(doc, route["route"]["cluster"]) == (name, int(flag(argv, "--port") or 0))


def test_envoy_serves_the_browser_client_from_the_webapp_and_no_catch_all() -> None:
    """The page at /, its files under /client/, the demo sign-in list, permalinks and shared files'
    uploads and downloads go to the webapp; no route matches every path (the webapp's /internal/,
    /metrics and /healthz stay inside)."""
    doc = load_yaml(ENVOY)
    _, routes = edge_routes(doc)
    api = next(r for r in routes if r["match"].get("prefix") == "/api/")
    pages = ({"path": "/"}, {"prefix": "/client/"}, {"path": "/demo/users"}, {"prefix": "/archives/"})
    for match in (*pages, {"prefix": "/upload/v1/"}, {"prefix": "/files-pri/"}):
        route = next((r for r in routes if r["match"] == match), None)
        assert route is not None, f"no edge route for the browser client's {match}"
        assert route["route"]["cluster"] == api["route"]["cluster"]
        assert not route["route"].get("upgrade_configs")
    assert not any(r["match"].get("prefix") in ("/", "") for r in routes), "a catch-all would expose /internal/"
    for path in ("/internal/bootstrap", "/metrics", "/healthz"):
        matched = [
            r for r in routes if r["match"].get("path") == path or path.startswith(r["match"].get("prefix", "\0"))
        ]
        assert not matched, f"{path} must not be routed at the edge"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # envoy-data-plane's pydantic validators, at import
def test_envoy_config_matches_envoys_v3_api() -> None:
    """Every field name and type in envoy.yaml, typed_config extensions included, is Envoy's
    v3 API (envoy-data-plane: Envoy's protos as Python messages; unknown fields are refused)."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    text = ENVOY.read_text()
    for type_url in set(re.findall(r"type\.googleapis\.com/([\w.]+)", text)):
        importlib.import_module("envoy_data_plane." + type_url.rsplit(".", 1)[0])  # registers the message type
    doc = yaml.safe_load(text)
    Bootstrap().from_dict(doc)
    broken = yaml.safe_load(text)
    broken["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(KeyError):  # the check has teeth
        Bootstrap().from_dict(broken)


def test_gen_cert_makes_a_certificate_and_the_secret(tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("no openssl here")
    env = {
        **os.environ,
        "CERT_DIR": str(tmp_path / "certs"),
        "ENV_FILE": str(tmp_path / ".env"),
        "TLS_DIR": str(tmp_path / "tls"),
        "RTM_EDGE_HOST": "rtm.test",
    }
    subprocess.run(["sh", str(DEPLOY / "gen-cert.sh")], check=True, env=env, capture_output=True, timeout=60)
    crt, key = tmp_path / "certs" / "edge.crt", tmp_path / "certs" / "edge.key"
    out = subprocess.run(
        ["openssl", "x509", "-in", str(crt), "-noout", "-subject", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "rtm.test" in out and "localhost" in out
    pub_crt = subprocess.run(
        ["openssl", "x509", "-in", str(crt), "-noout", "-pubkey"], check=True, capture_output=True
    ).stdout
    pub_key = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], check=True, capture_output=True).stdout
    assert pub_crt == pub_key, "key and certificate do not match"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, "the edge key is readable by others"
    secret = (tmp_path / ".env").read_text()
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600, "secrets and tokens: 0600"
    values = dict(line.split("=", 1) for line in secret.splitlines())
    assert list(values) == list(ENV_VARS), values.keys()
    assert values["RTM_TLS_GID"] == str(CONTAINER_UID if os.getuid() == 0 else os.getgid())
    # Envoy runs as the edge key's owner (the key stays 0600), never as root
    assert (values["RTM_EDGE_UID"], values["RTM_EDGE_GID"]) == (str(key.stat().st_uid), str(key.stat().st_gid))
    assert values["RTM_EDGE_UID"] != "0" and values["RTM_EDGE_GID"] != "0"
    assert re.fullmatch(r"[0-9a-f]{64}", values["RTM_SECRET"])
    tokens = [v for k, v in values.items() if k.endswith("_TOKEN") or "_TOKEN_" in k]
    assert len(tokens) == len(TOKEN_SERVICES) + 2 and len(set(tokens)) == len(tokens), "one distinct token each"
    assert all(re.fullmatch(UUID_RE, t) for t in tokens), tokens
    assert re.fullmatch(r"[0-9a-f]{48}", values["GRAFANA_ADMIN_PASSWORD"])
    subprocess.run(["sh", str(DEPLOY / "gen-cert.sh")], check=True, env=env, capture_output=True, timeout=60)
    assert (tmp_path / ".env").read_text() == secret, "a second run keeps every secret"
    # an older .env with only RTM_SECRET gets the rest added, its secret kept
    (tmp_path / ".env").write_text(f"RTM_SECRET={values['RTM_SECRET']}\n")
    subprocess.run(["sh", str(DEPLOY / "gen-cert.sh")], check=True, env=env, capture_output=True, timeout=60)
    again = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert list(again) == list(ENV_VARS) and again["RTM_SECRET"] == values["RTM_SECRET"]


# -- (c'') the internal wire's certificates ----------------------------------------------------


def tls_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that speak on the internal wire: every rtm process, and the on-demand operator."""
    found = dict(rtm_services(doc))
    found.update({n: s for n, s in doc["services"].items() if "RTM_TLS_CERT" in (s.get("environment") or {})})
    return found


def expected_identity(name: str, svc: dict[str, Any]) -> PeerIdentity:
    """Who the process in ``svc`` is: its command's service and its --instance-id (the operator: "operator")."""
    if name == "operator":
        return PeerIdentity(OPERATOR, "operator")
    argv = rtm_argvs(svc)[-1]
    return PeerIdentity(argv[0], str(flag(argv, "--instance-id")))


def tls_mounts(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's bind mounts of deploy/tls/ files, by their target in the container."""
    return {
        v["target"]: v
        for v in svc.get("volumes", [])
        if isinstance(v, dict) and str(v.get("source", "")).startswith("./tls/")
    }


def gen_cert_fleet() -> dict[str, list[str]]:
    """The FLEET list in gen-cert.sh: service -> instance ids it issues certificates for."""
    block = re.search(r'^FLEET="(.*?)"$', GEN_CERT.read_text(), re.M | re.S)
    assert block, "gen-cert.sh has no FLEET list"
    fleet: dict[str, list[str]] = {}
    for line in block[1].splitlines():
        service, *instances = line.split()
        fleet.setdefault(service, []).extend(instances)
    return fleet


def test_every_fleet_process_has_its_own_certificate_and_key() -> None:
    """RTM_TLS_CA/CERT/KEY point at read-only mounts of the CA and of this process's own files,
    named by its --instance-id, which gen-cert.sh issues for exactly that identity."""
    doc = compose()
    services = tls_services(doc)
    assert set(rtm_services(doc)) < set(services), "every rtm process speaks on the wire"
    fleet = gen_cert_fleet()
    issued = {PeerIdentity(service, i) for service, instances in fleet.items() for i in instances}
    seen_files: dict[str, str] = {}
    identities = []
    for name, svc in services.items():
        env = svc["environment"]
        mounts = tls_mounts(svc)
        identity = expected_identity(name, svc)
        identities.append(identity)
        want = {
            "RTM_TLS_CA": "./tls/ca.crt",
            "RTM_TLS_CERT": f"./tls/{identity.instance}.crt",
            "RTM_TLS_KEY": f"./tls/{identity.instance}.key",
        }
        for var, source in want.items():
            target = env.get(var)
            assert target and target.startswith(TLS_MOUNT_DIR + "/"), f"{name}: {var} = {target!r}"
            mount = mounts.get(target)
            assert mount is not None, f"{name}: {var} points at {target}, which nothing mounts"
            assert mount["source"] == source, f"{name}: {target} is {mount['source']}, not its own {source}"
            assert mount["type"] == "bind" and mount.get("read_only") is True, f"{name}: {target} must be read-only"
            assert mount.get("bind", {}).get("create_host_path") is False, (
                f"{name}: a missing {source} must stop the container, not become an empty directory"
            )
            if var != "RTM_TLS_CA":
                assert source not in seen_files, f"{name} and {seen_files[source]} share {source}"
                seen_files[source] = name
        assert set(mounts) == {env["RTM_TLS_CA"], env["RTM_TLS_CERT"], env["RTM_TLS_KEY"]}, (
            f"{name} mounts TLS files that are not its own: {sorted(m['source'] for m in mounts.values())}"
        )
        assert identity in issued, f"{name} runs as {identity.uri()}, which gen-cert.sh does not issue"
        assert "replicas" not in (svc.get("deploy") or {}), f"{name}: replicas would share {identity.uri()}"
        assert svc.get("group_add") == ["${RTM_TLS_GID:?run deploy/gen-cert.sh}"], f"{name}: group_add"
    assert len(set(identities)) == len(identities), "two services under one identity"
    assert issued == set(identities), f"gen-cert.sh issues for no service: {issued - set(identities)}"
    # and nobody else sees the fleet's files (the CA key least of all)
    for name, svc in doc["services"].items():
        if name not in services:
            assert not any("tls" in json.dumps(v) for v in svc.get("volumes", [])), f"{name} mounts TLS files"


def test_webapp_internal_listener_stays_inside_the_compose_network() -> None:
    doc = compose()
    webapp = rtm_services(doc)["webapp"]
    internal = flag(rtm_argvs(webapp)[-1], "--internal-port")
    assert internal and internal != "0", "the gateways find /internal/ on a fixed port"
    for name, svc in doc["services"].items():
        published = [str(p) for p in svc.get("ports", [])]
        assert not any(p.split(":")[-1].split("/")[0] == internal for p in published), f"{name} publishes {internal}"
    envoy = load_yaml(ENVOY)
    for cluster in envoy["static_resources"]["clusters"]:
        if cluster["name"] == "envoy_admin":
            continue
        assert cluster_endpoint(envoy, cluster["name"])[1] != int(internal), f"Envoy reaches /internal/ ({cluster})"


def handshake(ca: Path, server: tuple[Path, Path], client: tuple[Path, Path]) -> tuple[PeerIdentity, PeerIdentity]:
    """A mutual TLS handshake in memory with services/tls.py's contexts; the identities each side saw."""
    import ssl

    server_ctx = server_context(ca, *server)
    client_ctx = client_context(ca, *client)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"srv": False, "cli": False}
    for _ in range(10):  # TLS 1.3: a few flights
        for side, obj in (("cli", cli), ("srv", srv)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    return identity_from_peercert(cli.getpeercert()), identity_from_peercert(srv.getpeercert())


def run_gen_cert(tmp_path: Path, *args: str, access: str = "") -> Path:
    env = {
        **os.environ,
        "CERT_DIR": str(tmp_path / "certs"),
        "ENV_FILE": str(tmp_path / ".env"),
        "TLS_DIR": str(tmp_path / "tls"),
        "RTM_PYTHON": sys.executable,
    }
    if access:
        env["RTM_TLS_ACCESS"] = access
    result = subprocess.run(["sh", str(GEN_CERT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "tls"


def test_gen_cert_makes_the_certificates_each_process_starts_with(tmp_path: Path) -> None:
    """Run for real: each compose process's files load as exactly that process's identity
    (services/tls.py, as the process does at start), chain to the fleet CA in a real mutual
    handshake, are 0600 and the containers' (0640 to the operator's group without root);
    a rerun keeps them; a rotation issues every one anew from a new CA."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl here")
    tls_dir = run_gen_cert(tmp_path)
    as_root = os.getuid() == 0
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    ca_key = tls_dir / "ca.key"
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600 and ca_key.stat().st_uid == os.getuid()
    services = tls_services(compose())
    files = {name: tls_dir / f"{expected_identity(name, svc).instance}" for name, svc in services.items()}
    for path in [tls_dir / "ca.crt", *(p.with_suffix(s) for p in files.values() for s in (".crt", ".key"))]:
        st = path.stat()
        if as_root:
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, CONTAINER_UID, CONTAINER_UID), path
        else:
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, os.getgid()), path
    ca = tls_dir / "ca.crt"
    webapp = (files["webapp"].with_suffix(".crt"), files["webapp"].with_suffix(".key"))
    for name, svc in services.items():
        want = expected_identity(name, svc)
        cert, key = files[name].with_suffix(".crt"), files[name].with_suffix(".key")
        assert identity_of(cert.read_bytes()) == want, name
        # what the process does at start: its certificate must name its service and --instance-id
        args = argparse.Namespace(
            wire_tls=WIRE_TLS_ON,
            tls_ca=str(ca),
            tls_cert=str(cert),
            tls_key=str(key),
            tls_handshake_timeout_s=5.0,
            instance_id=want.instance,
        )
        assert trust_from_args(args, want.service).identity == want, name
        seen_by_client, seen_by_server = handshake(ca, webapp, (cert, key))
        assert seen_by_server == want and seen_by_client == identity_of(webapp[0].read_bytes()), name
    with pytest.raises(TrustConfigError):  # and not under another process's identity
        trust_from_args(
            argparse.Namespace(**{**vars(args), "instance_id": "someone-else"}), expected_identity(name, svc).service
        )

    before = {p.name: p.read_bytes() for p in tls_dir.iterdir()}
    run_gen_cert(tmp_path)
    assert {p.name: p.read_bytes() for p in tls_dir.iterdir()} == before, "a rerun keeps every file"

    run_gen_cert(tmp_path, "--rotate-fleet-ca")
    assert ca.read_bytes() != before["ca.crt"] and ca_key.read_bytes() != before["ca.key"]
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes(before["ca.crt"])
    for name in services:
        cert, key = files[name].with_suffix(".crt"), files[name].with_suffix(".key")
        assert cert.read_bytes() != before[cert.name] and key.read_bytes() != before[key.name], name
        handshake(ca, webapp, (cert, key))  # under the new CA
    import ssl

    with pytest.raises(ssl.SSLError):  # a process still trusting the old CA refuses the new certificates
        handshake(old_ca, webapp, webapp)


def test_gen_cert_without_root_makes_files_for_the_operators_group(tmp_path: Path) -> None:
    """RTM_TLS_ACCESS=group (what a non-root run does): 0640 to the creator's group, which the
    containers get as RTM_TLS_GID; the CA key stays 0600."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl here")
    tls_dir = run_gen_cert(tmp_path, access="group")
    env = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert env["RTM_TLS_GID"] == str(os.getgid())
    assert stat.S_IMODE((tls_dir / "ca.key").stat().st_mode) == 0o600
    for path in tls_dir.iterdir():
        if path.name != "ca.key":
            st = path.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, os.getuid(), os.getgid()), path
    # switching to the other way with the first one's RTM_TLS_GID in .env is refused, not half-done
    if os.getuid() == 0 and os.getgid() != CONTAINER_UID:
        env_run = {**os.environ, "CERT_DIR": str(tmp_path / "certs"), "ENV_FILE": str(tmp_path / ".env")}
        env_run |= {"TLS_DIR": str(tls_dir), "RTM_PYTHON": sys.executable, "RTM_TLS_ACCESS": "owner"}
        result = subprocess.run(["sh", str(GEN_CERT)], env=env_run, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "RTM_TLS_GID" in result.stderr


# -- (c') Consul ACLs ---------------------------------------------------------------------------


def policy_rules(name: str) -> list[tuple[str, str, str]]:
    """(resource, name, level) of every rule in deploy/consul/policies/<name>.hcl; any other line fails."""
    rules = []
    for line in (POLICIES / f"{name}.hcl").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = RULE_RE.match(line)
        assert match, f"{name}.hcl: not a rule this check understands: {line!r}"
        rules.append((match[1], match[2], match[3]))
    return rules


def writes(rules: list[tuple[str, str, str]], resource: str, target: str) -> bool:
    """Whether ``rules`` give write on ``resource`` ``target`` (exact rule, else the longest prefix rule)."""
    exact = [lvl for res, name, lvl in rules if res == resource and name == target]
    if exact:
        return exact[0] == "write"
    prefixes = sorted(
        ((name, lvl) for res, name, lvl in rules if res == f"{resource}_prefix" and target.startswith(name)),
        key=lambda p: len(p[0]),
    )
    return bool(prefixes) and prefixes[-1][1] == "write"


def test_consul_runs_with_acls_default_deny_and_the_management_token_from_env() -> None:
    consul = compose()["services"]["consul"]
    local = json.loads(consul["environment"]["CONSUL_LOCAL_CONFIG"])
    acl = local["acl"]
    assert acl["enabled"] is True and acl["default_policy"] == "deny"
    assert acl["tokens"]["initial_management"].startswith("${CONSUL_MANAGEMENT_TOKEN:?")
    assert acl["tokens"]["agent"].startswith("${CONSUL_AGENT_TOKEN:?")
    init = compose()["services"]["consul-acl-init"]
    assert init["environment"]["CONSUL_HTTP_TOKEN"].startswith("${CONSUL_MANAGEMENT_TOKEN:?")
    assert "./consul/policies:/rtm/policies:ro" in init["volumes"]
    assert init["depends_on"]["consul"]["condition"] == "service_healthy"


def test_each_rtm_container_gets_only_its_own_consul_token() -> None:
    doc = compose()
    for name, svc in rtm_services(doc).items():
        command = rtm_argvs(svc)[-1][0]
        var = "RTM_CONSUL_TOKEN_" + command.replace("-", "_").upper()
        env = svc["environment"]
        assert env["CONSUL_HTTP_TOKEN"] == f"${{{var}:?run deploy/gen-cert.sh}}", name
        others = [v for k, v in env.items() if "TOKEN" in k and k != "CONSUL_HTTP_TOKEN"]
        assert not others and "CONSUL_MANAGEMENT_TOKEN" not in json.dumps(env), f"{name} sees other tokens"
    prom = doc["services"]["prometheus"]
    assert prom["environment"]["PROMETHEUS_CONSUL_TOKEN"].startswith("${RTM_CONSUL_TOKEN_PROMETHEUS:?")
    assert "umask 077" in prom["command"][0] and "/prometheus/consul-token" in prom["command"][0]
    scrape = {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}
    for auth in (scrape["rtm"]["consul_sd_configs"][0]["authorization"], scrape["consul"]["authorization"]):
        assert auth == {"type": "Bearer", "credentials_file": "/prometheus/consul-token"}


def test_every_policy_has_a_token_and_every_token_is_generated() -> None:
    script = ACL_INIT.read_text()
    policies = sorted(p.stem for p in POLICIES.glob("*.hcl"))
    token_lines = re.findall(r'^token (\S+) "\$(\w+)"$', script, re.M)
    assert sorted(name for name, _ in token_lines) == policies
    generated = GEN_CERT.read_text()
    init_env = compose()["services"]["consul-acl-init"]["environment"]
    for _, var in token_lines:
        assert var in init_env, var
        assert var in ENV_VARS and (f"add {var} " in generated or var.startswith("RTM_CONSUL_TOKEN_")), var
    assert "for service in " + " ".join(TOKEN_SERVICES) + ";" in generated


def test_policies_let_each_service_write_only_its_own_registrations_and_documents() -> None:
    services = registered_names()
    everyone = {p.stem: policy_rules(p.stem) for p in POLICIES.glob("*.hcl")}
    for name in services:
        rules = everyone[name]
        assert writes(rules, "service", name), f"{name} cannot register itself"
        for other in services - {name}:
            assert not writes(rules, "service", other), f"{name} may write {other}'s registrations"
        assert ("service_prefix", "", "read") in rules and ("node_prefix", "", "read") in rules
        assert ("key_prefix", "rtm/", "read") in rules, f"{name} cannot read the rings"
    for policy, rules in everyone.items():
        for ring in ("rtm/ring/channel", "rtm/ring/presence", "rtm/charm/leader"):
            assert writes(rules, "key", ring) == (policy == "charm"), f"{policy} vs {ring}"
        for key in ("rtm/regions/drained/us-east", "rtm/regions/map"):
            assert writes(rules, "key", key) == (policy == "operator"), f"{policy} vs {key}"
        assert not any(res in ("acl", "operator", "keyring") for res, _, _ in rules), policy
        blanket = [(res, lvl) for res, name, lvl in rules if name == "" and lvl == "write"]
        allowed = {"charm": [("session_prefix", "write")], "agent": [("node_prefix", "write")]}
        assert blanket == allowed.get(policy, []), f"{policy}: write on everything: {blanket}"
    assert not any(writes(everyone["operator"], "service", s) for s in services), "the operator registers nothing"
    assert not any(r[2] == "write" for r in everyone["prometheus"]), "Prometheus only reads"


def test_grafana_admin_password_is_generated_not_admin() -> None:
    graf = next(s for s in compose()["services"].values() if str(s.get("image", "")).startswith("grafana/"))
    password = graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), password  # no default: compose refuses without it
    assert ":-" not in password and "admin}" not in password, "no default password"


# -- (d) Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_discovers_every_service_through_consul(tmp_path: Path) -> None:
    doc = load_yaml(PROMETHEUS)
    job = next(j for j in doc["scrape_configs"] if j.get("consul_sd_configs"))
    assert not job.get("static_configs"), "rtm processes come from Consul, not a static list"
    sd = job["consul_sd_configs"]
    assert [c["server"] for c in sd] == ["consul:8500"]
    assert set(sd[0]["services"]) == registered_names()
    assert any(
        "__meta_consul_service_metadata_metrics_port" in r.get("source_labels", [])
        and r.get("target_label") == "__address__"
        for r in job["relabel_configs"]
    )
    promtool = shutil.which("promtool")
    if promtool:  # Debian's promtool is built without Consul SD: check the rest with a static stand-in
        for j in doc["scrape_configs"]:
            if j.pop("consul_sd_configs", None):
                j["static_configs"] = [{"targets": ["stand-in:1"]}]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(doc))
        result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning() -> None:
    sources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "rtm.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]
    dash = json.loads(DASHBOARD.read_text())
    for panel in all_panels(dash):
        if panel.get("targets"):
            assert panel["datasource"]["uid"] in uids, panel["title"]
    titles = " ".join(p["title"].lower() for p in all_panels(dash))
    for topic in (
        "deliveries",
        "latency",
        "connections per gateway",
        "channels per channel server",
        "ring version",
        "failovers",
        "presence",
        "errors",
        "cpu per process",
        "memory (rss) per process",
        "open fds per process",
    ):
        assert topic in titles, f"the dashboard has no {topic} panel"


def test_per_process_panels_group_by_the_labels_every_rtm_target_gets() -> None:
    """The process_* series carry no labels of their own: a panel tells processes apart only by the
    target labels Prometheus' relabelling gives every rtm process (and keeps to the rtm job: Consul
    and Envoy are scraped too)."""
    job = next(j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j.get("consul_sd_configs"))
    target_labels = {rule["target_label"] for rule in job["relabel_configs"] if "target_label" in rule}
    found = 0
    for panel in all_panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            if not re.search(r"\bprocess_", target["expr"]):
                continue
            found += 1
            assert f'{{job="{job["job_name"]}"}}' in target["expr"], target["expr"]
            for grouping in re.findall(r"\bby \(([^)]*)\)", target["expr"]):
                labels = {label.strip() for label in grouping.split(",")}
                assert labels <= target_labels - {"__address__"}, (panel["title"], labels - target_labels)
    assert found >= 3, "CPU, memory and open fds per process"


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_metrics() -> set[str]:
    names: set[str] = set()
    for panel in all_panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            found = set(re.findall(r"\b(?:rtm|process)_[a-zA-Z0-9_]+", target["expr"]))
            assert found, f"{panel['title']}: {target['expr']} queries no rtm or process metric"
            names |= found
    return names


# -- the running fleet, on another address -----------------------------------------------------


@pytest.fixture(scope="module")
def fleet_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("fleet-elsewhere")
    base = free_port_base(host=ELSEWHERE)  # the later --port-base wins over the one Fleet.up picks on 127.0.0.1
    handle = Fleet.up(
        data_dir,
        "--host",
        ELSEWHERE,
        "--port-base",
        str(base),
        env={"RTM_LOG_FORMAT": "json", "RTM_LOG_LEVEL": "DEBUG"},
    )
    try:
        yield handle
    finally:
        handle.down()


async def traffic(fleet: Fleet) -> tuple[str, str]:
    """A message from alice to bob over the websocket, and one refused call; returns (channel, text)."""
    alice = fleet.user("alice")
    client = await fleet.connect("bob")
    try:
        assert client.url.startswith(f"ws://{ELSEWHERE}:"), client.url
        general = fleet.channel("general")
        text = f"elsewhere-{uuid.uuid4().hex[:8]}"
        assert (await fleet.api("chat.postMessage", alice["token"], channel=general, text=text))["ok"]
        await client.wait_texts([text], general)
        refused = await fleet.api("chat.postMessage", alice["token"], channel="CNOTTHERE", text="x")
        assert refused["error"] == "channel_not_found"
        await client.send({"id": 1, "type": "typing", "channel": general})
    finally:
        await client.close()
    return general, text


async def test_nothing_assumes_loopback_127_0_0_1(fleet_elsewhere: Fleet) -> None:
    fleet = fleet_elsewhere
    await traffic(fleet)
    fleet.reload()
    for key in ("webapp_url", "api_url", "consul_url"):
        assert fleet.info[key].split("://", 1)[1].startswith(f"{ELSEWHERE}:"), (key, fleet.info[key])
    for proc in fleet.info["processes"]:
        assert proc["host"] == ELSEWHERE, proc
    client = consul_client(fleet)
    _, services = client.catalog.services()
    assert registered_names() <= set(services), services
    for service in services:
        if service == "consul":
            continue
        _, entries = client.health.service(service)
        for entry in entries:
            assert entry["Service"]["Address"] == ELSEWHERE, entry["Service"]
            assert entry["Node"]["Address"] == ELSEWHERE, entry["Node"]


# -- (c) every metric on the dashboard exists --------------------------------------------------


async def scrape(host: str, port: int) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 200, (host, port, resp.status)
            return await resp.text()


async def test_every_dashboard_metric_is_exposed_by_the_fleet(fleet_elsewhere: Fleet) -> None:
    fleet = fleet_elsewhere
    await traffic(fleet)
    fleet.reload()
    wanted = dashboard_metrics()
    per_process = {name for name in wanted if name.startswith("process_")}  # the per-process panels'
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= per_process

    async def exposed() -> dict[str, set[str]]:
        by_process: dict[str, set[str]] = {}
        for proc in fleet.info["processes"]:
            text = await scrape(proc["host"], proc["metrics_port"])
            samples = by_process.setdefault(proc["name"], set())
            for family in text_string_to_metric_families(text):
                samples |= {s.name for s in family.samples}
        return by_process

    def missing(by_process: dict[str, set[str]]) -> list[str]:
        gaps = sorted(wanted - set().union(*by_process.values()))
        gaps += [
            f"{name}: {sorted(per_process - samples)}" for name, samples in by_process.items() if per_process - samples
        ]
        return gaps

    async def covered() -> bool:
        return not missing(await exposed())

    try:  # presence reports and CHARM's gauges may lag the traffic a little: wait, bounded
        await async_wait_until(covered, what="every dashboard metric")
    except AssertionError:
        raise AssertionError(
            f"queried by the dashboard, exposed by no process (or, per process, not by each): {missing(await exposed())}"
        ) from None


# -- (d) Prometheus' relabelling against what Consul holds -------------------------------------


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' `replace` and `keep` relabel actions (regexes fully anchored, as in Prometheus)."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                replacement = re.sub(
                    r"\$\{(\d+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", rule.get("replacement", "$1")
                )
                labels[rule["target_label"]] = match.expand(replacement)
        else:
            raise AssertionError(f"relabel action {action} not emulated here")
    return labels


def consul_sd_labels(entry: dict[str, Any]) -> dict[str, str]:
    """The meta labels Prometheus' consul_sd_configs gives one health entry."""
    svc, node = entry["Service"], entry["Node"]
    address = svc.get("Address") or node["Address"]
    labels = {
        "__address__": f"{address}:{svc['Port']}",
        "__meta_consul_address": node["Address"],
        "__meta_consul_service": svc["Service"],
        "__meta_consul_service_id": svc["ID"],
        "__meta_consul_service_address": svc.get("Address", ""),
        "__meta_consul_service_port": str(svc["Port"]),
        "__meta_consul_tags": "," + ",".join(svc.get("Tags") or []) + ",",
    }
    for key, value in (svc.get("Meta") or {}).items():
        labels["__meta_consul_service_metadata_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    return labels


async def test_prometheus_relabelling_finds_every_registered_process(fleet_elsewhere: Fleet) -> None:
    fleet = fleet_elsewhere
    fleet.reload()
    job = next(j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j.get("consul_sd_configs"))
    client = consul_client(fleet)
    targets: dict[str, dict[str, str]] = {}
    for service in job["consul_sd_configs"][0]["services"]:
        _, entries = client.health.service(service)
        for entry in entries:
            labels = relabel(consul_sd_labels(entry), job["relabel_configs"])
            assert labels is not None, f"{entry['Service']['ID']} would not be scraped"
            targets[labels["instance"]] = labels
    by_id = {p["id"]: p for p in fleet.info["processes"] if p["service"] != "consul-dev"}
    assert set(targets) == set(by_id), (sorted(targets), sorted(by_id))
    for iid, labels in targets.items():
        proc = by_id[iid]
        assert labels["__address__"] == f"{proc['host']}:{proc['metrics_port']}", labels
        assert labels["service"] == proc["service"]
        host, port = labels["__address__"].rsplit(":", 1)
        assert "rtm_process_info" in await scrape(host, int(port))
    assert {t["region"] for t in targets.values() if t["service"] == "gateway"} == {"us-east", "eu-west"}


# -- structured logs: one message across processes ----------------------------------------------


async def test_one_message_can_be_followed_by_its_eid(fleet_elsewhere: Fleet) -> None:
    fleet = fleet_elsewhere
    general, text = await traffic(fleet)
    log_path = fleet.data_dir / "fleet.log"

    def entries() -> list[dict[str, Any]]:
        found = []
        for line in log_path.read_text(errors="replace").splitlines():
            start = line.find("{")
            if start < 0 or '"eid"' not in line:
                continue
            try:
                entry = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    async def eid_of_text() -> str | None:
        for entry in entries():
            if entry.get("msg", "").startswith("committed ") and text in entry["msg"]:
                return str(entry["eid"])
        return None

    eid = await async_wait_until(eid_of_text, what="the webapp's log line for the message")
    assert eid.startswith(general + ":")
    by_service = {p["id"]: p["service"] for p in fleet.info["processes"]}

    async def followed() -> set[str] | None:
        seen = {by_service.get(e["instance"], e["instance"]) for e in entries() if e.get("eid") == eid}
        return seen if {"webapp", "admin-server", "channel-server", "gateway"} <= seen else None

    await async_wait_until(
        followed, what=f"log lines with eid {eid} from webapp, admin server, channel server, gateway"
    )
    for entry in entries():
        assert {"ts", "level", "logger", "instance", "msg", "eid"} <= set(entry), entry


def test_rtm_ups_dev_agent_gives_each_role_deploys_rules() -> None:
    """``rtm up``'s per-role tokens (rtmctl.consul_roles) carry exactly the rules of
    deploy/consul/policies/<role>.hcl, so the dev agent and real Consul enforce the same thing."""
    from rtmctl.consul_roles import ROLES, role_rules

    for role in ROLES:
        from_hcl: dict[str, dict[str, dict[str, str]]] = {}
        for resource, name, level in policy_rules(role):
            from_hcl.setdefault(resource, {})[name] = {"policy": level}
        assert role_rules(role) == from_hcl, role
