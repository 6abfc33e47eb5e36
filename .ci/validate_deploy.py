"""Offline checks of deploy/kubernetes, run by .ci/validate-deploy.sh in its venv.

1. The kustomization: every file its `resources` lists exists, once; every manifest in
   the directory is listed except secret.example.yaml, which must not be (no
   credential is applied from git), and no listed file holds a Secret.
2. Every core object, in the listed files and in secret.example.yaml, against the
   Kubernetes OpenAPI schemas that kubernetes-validate bundles, strictly (an unknown
   field is an error, as under kubectl's default strict field validation). A kind it
   has no schema for is an error too, not the CLI's warning. keda.sh objects are left
   to check-jsonschema: their files are written to --keda-list.
3. What no schema can see: the objects' references to one another (names, labels,
   ports, Secret keys) and the settings the manifests' comments promise (probe paths,
   grace period arithmetic, the queue name and protocol the ScaledObject watches).
4. With --rendered FILE (the output of `kubectl kustomize`): kustomize renders exactly
   the listed objects.

Exit 1 on any failure, after printing every one found.
"""

import argparse
import pathlib
import sys

import yaml
import kubernetes_validate
from kubernetes_validate import utils as kv

EXAMPLE = "secret.example.yaml"
KEDA_API = "keda.sh/v1alpha1"
# `taskmill worker` stops within TASKMILL_GRACE_SECS + this many seconds of SIGTERM.
STOP_MARGIN_SECS = 5
# A timed-out handler gets this long to return before it is dropped.
HANDLER_STOP_SECS = 1


class Checks:
    def __init__(self):
        self.failures = []

    def fail(self, where, message):
        self.failures.append(f"{where}: {message}")
        print(f"FAIL {where}: {message}")

    def expect(self, condition, where, message):
        if not condition:
            self.fail(where, message)
        return condition


def load_one(path, checks):
    """The file's one YAML document (check-jsonschema reads one per file)."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        checks.fail(path.name, f"not YAML: {e}")
        return None
    if not checks.expect(len(docs) == 1, path.name, f"{len(docs)} documents, want 1"):
        return None
    doc = docs[0]
    if not checks.expect(
        isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys(),
        path.name,
        "not a Kubernetes object (apiVersion and kind)",
    ):
        return None
    return doc


def name_of(doc):
    return f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"


def check_kustomization(directory, checks):
    kfile = directory / "kustomization.yaml"
    kust = yaml.safe_load(kfile.read_text()) or {}
    checks.expect(
        kust.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
        and kust.get("kind") == "Kustomization",
        kfile.name,
        "apiVersion/kind are not kustomize.config.k8s.io/v1beta1 Kustomization",
    )
    resources = kust.get("resources") or []
    checks.expect(len(resources) == len(set(resources)), kfile.name, "a resource is listed twice")
    for name in resources:
        checks.expect((directory / name).is_file(), kfile.name, f"lists {name}, which does not exist")
    checks.expect(EXAMPLE not in resources, kfile.name, f"lists {EXAMPLE}: credentials would be applied from git")
    on_disk = {p.name for p in directory.iterdir() if p.suffix in (".yaml", ".yml")}
    for name in sorted(on_disk - set(resources) - {kfile.name, EXAMPLE}):
        checks.fail(kfile.name, f"{name} is in the directory but not in resources")
    print(f"ok   {kfile.name}: {len(resources)} resources, all present, all listed; {EXAMPLE} kept out")
    return [r for r in resources if (directory / r).is_file()]


def check_core(path, doc, version, checks):
    where = f"{path.name} {name_of(doc)}"
    try:
        validated = kubernetes_validate.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        at = ".".join(str(p) for p in e.path) or "(top)"
        checks.fail(where, f"Kubernetes {e.version} schema, at {at}: {e.message}")
        return
    except kv.SchemaNotFoundError as e:
        checks.fail(where, e.message)
        return
    if checks.expect(validated == version, where, f"validated against {validated}, not {version}"):
        print(f"ok   {where}: Kubernetes {validated} schema, strict")


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def runs_intake(container):
    """Whether `taskmill worker` runs the intake role: all roles unless --roles says."""
    args = list(container.get("command", [])) + list(container.get("args", []))
    for i, arg in enumerate(args):
        if arg == "--roles" and i + 1 < len(args):
            return "intake" in args[i + 1].split(",")
        if arg.startswith("--roles="):
            return "intake" in arg.split("=", 1)[1].split(",")
    return True


def check_references(objects, example, checks):
    by_kind = {}
    for doc in objects:
        by_kind.setdefault(doc["kind"], []).append(doc)
    one = lambda kind: (by_kind.get(kind) or [None])[0]  # noqa: E731
    deploy, service, pdb = one("Deployment"), one("Service"), one("PodDisruptionBudget")
    scaled, auth = one("ScaledObject"), one("TriggerAuthentication")
    for kind, doc in [("Deployment", deploy), ("Service", service), ("ScaledObject", scaled),
                      ("TriggerAuthentication", auth), ("PodDisruptionBudget", pdb)]:
        checks.expect(doc is not None, "kustomization", f"no {kind} among the resources")
    if None in (deploy, service, scaled, auth, pdb) or example is None:
        return
    w = name_of(deploy)
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    container = pod["spec"]["containers"][0]
    env = env_of(container)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}

    # Labels and ports.
    checks.expect(selects(deploy["spec"]["selector"].get("matchLabels"), pod_labels), w,
                  "selector does not match the pod template's labels")
    checks.expect(selects(service["spec"].get("selector"), pod_labels), name_of(service),
                  "selector does not match the worker pods")
    checks.expect(selects(pdb["spec"]["selector"].get("matchLabels"), pod_labels), name_of(pdb),
                  "selector does not match the worker pods")
    for sp in service["spec"]["ports"]:
        checks.expect(sp.get("targetPort") in ports or sp.get("targetPort") in ports.values(),
                      name_of(service), f"targetPort {sp.get('targetPort')} is no container port")
    http_addr = env.get("TASKMILL_HTTP_ADDR", "0.0.0.0:9464")
    checks.expect(ports.get("http") == int(http_addr.rsplit(":", 1)[1]), w,
                  f"container port `http` is not the port of TASKMILL_HTTP_ADDR ({http_addr})")

    # Probes: liveness on the process only, readiness on the dependencies.
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")]:
        get = (container.get(probe) or {}).get("httpGet") or {}
        checks.expect(get.get("path") == path and get.get("port") in ports, w,
                      f"{probe} is not an httpGet of {path} on a container port")

    # Shutdown: the grace period covers the longest task, the kubelet waits longer.
    grace = int(env.get("TASKMILL_GRACE_SECS") or 30)
    timeout = int(env.get("TASKMILL_TASK_TIMEOUT_SECS") or 60)
    term = pod["spec"].get("terminationGracePeriodSeconds", 30)
    checks.expect(grace >= timeout + HANDLER_STOP_SECS, w,
                  f"TASKMILL_GRACE_SECS={grace} does not cover TASKMILL_TASK_TIMEOUT_SECS={timeout}"
                  f" + {HANDLER_STOP_SECS} s for a timed-out handler to return")
    checks.expect(term > grace + STOP_MARGIN_SECS, w,
                  f"terminationGracePeriodSeconds={term} is not above grace {grace} + {STOP_MARGIN_SECS} s")

    # Secrets: every key the pods and KEDA read is in the example.
    secret_name = example["metadata"]["name"]
    example_keys = set((example.get("stringData") or {}) | (example.get("data") or {}))
    refs = [(w, e["valueFrom"]["secretKeyRef"]) for e in container.get("env", [])
            if "secretKeyRef" in (e.get("valueFrom") or {})]
    refs += [(name_of(auth), r) for r in auth["spec"].get("secretTargetRef", [])]
    for where, ref in refs:
        checks.expect(ref["name"] == secret_name and ref["key"] in example_keys, where,
                      f"reads {ref['name']}/{ref['key']}, which {EXAMPLE} does not define")
    checks.expect(any(r.get("parameter") == "host" for r in auth["spec"].get("secretTargetRef", [])),
                  name_of(auth), "does not supply the management URL as `host`")

    # Autoscaling: the right target, the right queue, counted over the management API.
    s = name_of(scaled)
    target = scaled["spec"]["scaleTargetRef"]
    checks.expect(target["name"] == deploy["metadata"]["name"]
                  and target.get("kind", "Deployment") == "Deployment", s,
                  f"scaleTargetRef is not Deployment/{deploy['metadata']['name']}")
    prefix = env.get("TASKMILL_PREFIX") or "taskmill"
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger.get("metadata", {})
        checks.expect(trigger.get("authenticationRef", {}).get("name") == auth["metadata"]["name"], s,
                      f"trigger does not use TriggerAuthentication/{auth['metadata']['name']}")
        checks.expect(meta.get("queueName") == f"{prefix}.work.default", s,
                      f"queueName {meta.get('queueName')!r} is not {prefix}.work.default")
        checks.expect(meta.get("protocol") == "http" and meta.get("mode") == "QueueLength", s,
                      "must count ready + unacked: protocol http, mode QueueLength")
        checks.expect(meta.get("value") == env.get("TASKMILL_PREFETCH", "256"), s,
                      f"value {meta.get('value')} is not TASKMILL_PREFETCH")
    spec = scaled["spec"]
    checks.expect(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), s,
                  "minReplicaCount is above maxReplicaCount (KEDA's own rule, which no schema here sees)")
    checks.expect(not runs_intake(container) or spec.get("minReplicaCount", 0) >= 1, s,
                  "minReplicaCount 0 while the scaled pods run the intake: the work queue would never fill")
    print("ok   references: names, labels, ports, Secret keys, probes, grace periods, queue and protocol")


def check_rendered(rendered, objects, checks):
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    got = sorted(name_of(d) for d in docs)
    want = sorted(name_of(d) for d in objects)
    if checks.expect(got == want, "kubectl kustomize", f"renders {got}, want {want}"):
        print(f"ok   kubectl kustomize renders the {len(got)} listed objects")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--keda-list", type=pathlib.Path, required=True)
    parser.add_argument("--rendered", type=pathlib.Path)
    args = parser.parse_args()

    checks = Checks()
    resources = check_kustomization(args.directory, checks)
    objects, keda_files, example = [], [], None
    for name in resources + [EXAMPLE]:
        path = args.directory / name
        if not path.is_file():
            checks.fail(name, "missing")
            continue
        doc = load_one(path, checks)
        if doc is None:
            continue
        if name == EXAMPLE:
            example = doc
            checks.expect(doc["kind"] == "Secret", name, "is not a Secret")
        else:
            objects.append(doc)
            checks.expect(doc["kind"] != "Secret", name, "a Secret in the kustomization would commit a credential")
        if doc["apiVersion"] == KEDA_API:
            keda_files.append(str(path))
        else:
            check_core(path, doc, args.kubernetes_version, checks)
    try:
        check_references(objects, example, checks)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        checks.fail("references", f"an object lacks what the checks read ({type(e).__name__}: {e})")
    if args.rendered:
        check_rendered(args.rendered, objects, checks)
    args.keda_list.write_text("".join(f"{f}\n" for f in keda_files))
    if checks.failures:
        print(f"{len(checks.failures)} failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
