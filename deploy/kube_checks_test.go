package deploy

import (
	"fmt"
	"net"
	"path"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/config"
)

// Names the manifests use; the tests find objects by them.
const (
	workerName      = "dlf-stop-worker"             // Deployment, ConfigMap, PDB
	workerContainer = "worker"                      // the worker's container
	credentialsName = "dlf-stop-worker-credentials" // Secret
)

// Defaults of the contract (section 7) that the checks fall back on when a
// manifest leaves the variable unset.
const (
	defaultShutdownTimeout = 20 * time.Second
	defaultHTTPAddr        = ":8080"
	defaultGracePeriod     = 30 * time.Second // Kubernetes' default
)

// shutdownSlack is the least time the pod's grace period must leave after
// SHUTDOWN_TIMEOUT: when it ends the worker still naks the commands it holds
// and drains its NATS connection, and a SIGKILL in between would leave them
// to wait out the ack wait instead of going to another pod at once. At
// worst, with a state bucket that stopped answering: a decision write sent
// just before is given up after up to 6s (its 5s and the sweeper's 1s
// tick), the command's progress write then takes up to 5s, the nak waits
// for one flush round trip (at most 1s) and the drain up to 5s. (The
// operations server's own shutdown comes after that and may be cut short.)
const shutdownSlack = 17 * time.Second

// goRuntimeEnv are variables the Go runtime reads, not the worker; a
// manifest may set them although config.EnvNames does not list them.
var goRuntimeEnv = map[string]bool{
	"GOMEMLIMIT":  true,
	"GOMAXPROCS":  true,
	"GOGC":        true,
	"GODEBUG":     true,
	"GOTRACEBACK": true,
}

// fileEnv reports whether a variable names a file holding a secret, which
// must come from a mounted Secret so that rotation reaches the worker.
func fileEnv(name string) bool {
	return strings.HasSuffix(name, "_FILE") || name == "NATS_CREDS" || name == "NATS_NKEY" || name == "NATS_KEY"
}

func knownEnv(t *testing.T) map[string]bool {
	t.Helper()
	names := config.EnvNames()
	if len(names) == 0 {
		t.Fatal("config.EnvNames() is empty")
	}
	known := map[string]bool{}
	for _, n := range names {
		known[n] = true
	}
	for n := range goRuntimeEnv {
		known[n] = true
	}
	return known
}

// envNameProblems lists every variable a manifest sets that the worker does
// not read: env entries, delete directives of patches, and the keys of
// ConfigMaps and Secrets loaded with envFrom.
func envNameProblems(ms []manifest, known map[string]bool) []string {
	var out []string
	for _, ps := range podSpecs(ms) {
		for _, c := range ps.containers() {
			names := envNames(ms, c)
			for _, e := range listAt(c, "env") {
				if isDelete(e) {
					names = append(names, str(e, "name"))
				}
			}
			for _, n := range names {
				if !known[n] {
					out = append(out, fmt.Sprintf("%s: container %s sets %s, which the worker does not read (not in config.EnvNames)", ps.at, str(c, "name"), n))
				}
			}
		}
	}
	return out
}

// refProblems lists references that do not resolve: envFrom and valueFrom
// sources, and *_FILE variables, which must name a key of a Secret mounted
// as a whole directory (a subPath mount is never updated, so a rotated
// secret would not reach the worker).
func refProblems(ms []manifest) []string {
	var out []string
	for _, ps := range podSpecs(ms) {
		volumes := map[string]map[string]any{}
		for _, v := range listAt(ps.spec, "volumes") {
			if m, ok := v.(map[string]any); ok {
				volumes[str(m, "name")] = m
			}
		}
		for _, c := range ps.containers() {
			env, problems := containerEnv(ms, c)
			for _, p := range problems {
				out = append(out, fmt.Sprintf("%s: %s", ps.at, p))
			}
			for _, name := range sortedKeys(env) {
				if !fileEnv(name) || env[name] == "" {
					continue
				}
				if p := secretFileProblem(ms, c, volumes, env[name]); p != "" {
					out = append(out, fmt.Sprintf("%s: container %s: %s=%s %s", ps.at, str(c, "name"), name, env[name], p))
				}
			}
		}
	}
	return out
}

// secretFileProblem says what is wrong with file as a path into a mounted
// Secret, or "".
func secretFileProblem(ms []manifest, c map[string]any, volumes map[string]map[string]any, file string) string {
	for _, vm := range listAt(c, "volumeMounts") {
		dir := str(vm, "mountPath")
		rel, ok := strings.CutPrefix(path.Clean(file), path.Clean(dir)+"/")
		if dir == "" || !ok {
			continue
		}
		if str(vm, "subPath") != "" || str(vm, "subPathExpr") != "" {
			return fmt.Sprintf("is under mount %s, which uses subPath: Kubernetes never updates it, so rotation would not reach the worker", dir)
		}
		vol := volumes[str(vm, "name")]
		secretName := str(vol, "secret", "secretName")
		if secretName == "" {
			return fmt.Sprintf("is under mount %s, which is not a Secret volume", dir)
		}
		secrets := find(ms, "Secret", secretName)
		if len(secrets) == 0 {
			return fmt.Sprintf("is in Secret %q, which is not defined under %s", secretName, kubeDir)
		}
		keys := dataKeys(secrets[0])
		if items := listAt(vol, "secret", "items"); len(items) > 0 {
			keys = map[string]bool{}
			for _, it := range items {
				keys[str(it, "path")] = true
			}
		}
		if !keys[rel] {
			return fmt.Sprintf("names %q in Secret %q, which has no key %q", rel, secretName, rel)
		}
		return ""
	}
	return "is not under any volumeMount of the container"
}

// workerDeployment finds the worker Deployment and its container.
func workerDeployment(ms []manifest) (dep manifest, container map[string]any, err error) {
	deps := find(ms, "Deployment", workerName)
	var full []manifest
	for _, d := range deps {
		if !strings.HasPrefix(d.file, "components/") {
			full = append(full, d)
		}
	}
	if len(full) != 1 {
		return manifest{}, nil, fmt.Errorf("want one Deployment %q outside components/, found %d", workerName, len(full))
	}
	dep = full[0]
	for _, c := range listAt(dep.obj, "spec", "template", "spec", "containers") {
		if str(c, "name") == workerContainer {
			return dep, c.(map[string]any), nil
		}
	}
	return dep, nil, fmt.Errorf("%s: no container named %q", dep, workerContainer)
}

// workerProblems checks the worker Deployment: probes, ports, shutdown
// timing, security context, resources and scrape annotations.
func workerProblems(ms []manifest) []string {
	dep, c, err := workerDeployment(ms)
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	bad := func(format string, args ...any) {
		out = append(out, fmt.Sprintf("%s: ", dep)+fmt.Sprintf(format, args...))
	}
	pod := mapAt(dep.obj, "spec", "template", "spec")
	env, _ := containerEnv(ms, c)

	if n, ok := intAt(dep.obj, "spec", "replicas"); !ok || n < 2 {
		bad("replicas must be at least 2 (several workers share the durable consumer), got %v", get(dep.obj, "spec", "replicas"))
	}
	if str(c, "image") == "" {
		bad("container %s has no image", workerContainer)
	}

	// The http port serves /metrics, /healthz and /readyz on HTTP_ADDR.
	addr := env["HTTP_ADDR"]
	if addr == "" {
		addr = defaultHTTPAddr
	}
	httpPort := 0
	for _, p := range listAt(c, "ports") {
		if str(p, "name") == "http" {
			httpPort, _ = intAt(p, "containerPort")
		}
	}
	if _, port, err := net.SplitHostPort(addr); err != nil {
		bad("HTTP_ADDR %q: %v", addr, err)
	} else if httpPort == 0 {
		bad("container %s has no port named http", workerContainer)
	} else if strconv.Itoa(httpPort) != port {
		bad("port http is %d but HTTP_ADDR %q listens on %s", httpPort, addr, port)
	}

	for _, probe := range []struct{ field, path string }{
		{"livenessProbe", "/healthz"},
		{"readinessProbe", "/readyz"},
	} {
		hg := mapAt(c, probe.field, "httpGet")
		if hg == nil {
			bad("%s: want an httpGet probe on %s", probe.field, probe.path)
			continue
		}
		if got := str(hg, "path"); got != probe.path {
			bad("%s: path %q, want %q", probe.field, got, probe.path)
		}
		switch port := hg["port"].(type) {
		case string:
			if port != "http" {
				bad("%s: port %q, want the port named http", probe.field, port)
			}
		case int:
			if port != httpPort {
				bad("%s: port %d, want the http port %d", probe.field, port, httpPort)
			}
		default:
			bad("%s: no port", probe.field)
		}
	}

	// Shutdown: the kubelet must wait longer than the worker's own deadline.
	shutdown := defaultShutdownTimeout
	if s := env["SHUTDOWN_TIMEOUT"]; s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			bad("SHUTDOWN_TIMEOUT %q: %v", s, err)
		}
		shutdown = d
	}
	grace := defaultGracePeriod
	if n, ok := intAt(pod, "terminationGracePeriodSeconds"); ok {
		grace = time.Duration(n) * time.Second
	}
	if grace < shutdown+shutdownSlack {
		bad("terminationGracePeriodSeconds (%s) must exceed SHUTDOWN_TIMEOUT (%s) by at least %s", grace, shutdown, shutdownSlack)
	}

	// Security: container settings override the pod's.
	effective := func(field string) any {
		if v, ok := mapAt(c, "securityContext")[field]; ok {
			return v
		}
		return mapAt(pod, "securityContext")[field]
	}
	if effective("runAsNonRoot") != true {
		bad("runAsNonRoot must be true")
	}
	if uid, ok := effective("runAsUser").(int); ok && uid == 0 {
		bad("runAsUser must not be 0")
	}
	csc := mapAt(c, "securityContext")
	if csc["readOnlyRootFilesystem"] != true {
		bad("readOnlyRootFilesystem must be true")
	}
	if csc["allowPrivilegeEscalation"] != false {
		bad("allowPrivilegeEscalation must be false")
	}
	if csc["privileged"] == true {
		bad("privileged must not be true")
	}
	dropsAll := false
	for _, cp := range listAt(csc, "capabilities", "drop") {
		dropsAll = dropsAll || cp == "ALL"
	}
	if !dropsAll {
		bad("capabilities.drop must contain ALL")
	}

	// Resources: a memory limit, a request below it, and the Go runtime's
	// soft limit below the hard one.
	limit, err := parseQuantity(str(c, "resources", "limits", "memory"))
	if err != nil {
		bad("resources.limits.memory: %v", err)
	}
	if req, err := parseQuantity(str(c, "resources", "requests", "memory")); err != nil {
		bad("resources.requests.memory: %v", err)
	} else if limit > 0 && req > limit {
		bad("memory request %d is above the limit %d", req, limit)
	}
	if s := str(c, "resources", "requests", "cpu"); s == "" {
		bad("resources.requests.cpu is not set")
	}
	if s, ok := env["GOMEMLIMIT"]; ok && limit > 0 {
		if n, err := parseGoBytes(s); err != nil {
			bad("GOMEMLIMIT %q: %v", s, err)
		} else if n >= limit {
			bad("GOMEMLIMIT %q must be below the memory limit (%d bytes)", s, limit)
		}
	}

	// Prometheus scrapes the pod's http port.
	ann := mapAt(dep.obj, "spec", "template", "metadata", "annotations")
	if scalar(ann["prometheus.io/scrape"]) != "true" {
		bad(`annotation prometheus.io/scrape must be "true"`)
	}
	if p := scalar(ann["prometheus.io/port"]); p != strconv.Itoa(httpPort) {
		bad("annotation prometheus.io/port %q, want the http port %d", p, httpPort)
	}
	if p, ok := ann["prometheus.io/path"]; ok && scalar(p) != "/metrics" {
		bad("annotation prometheus.io/path %q, want /metrics", scalar(p))
	}
	return out
}

// pdbProblems checks that a PodDisruptionBudget covers the worker pods and
// leaves at least one running.
func pdbProblems(ms []manifest) []string {
	dep, _, err := workerDeployment(ms)
	if err != nil {
		return []string{err.Error()}
	}
	pdbs := find(ms, "PodDisruptionBudget", "")
	if len(pdbs) != 1 {
		return []string{fmt.Sprintf("want one PodDisruptionBudget, found %d", len(pdbs))}
	}
	pdb := pdbs[0]
	var out []string
	labels := mapAt(dep.obj, "spec", "template", "metadata", "labels")
	sel := mapAt(pdb.obj, "spec", "selector", "matchLabels")
	if len(sel) == 0 {
		out = append(out, fmt.Sprintf("%s: selector.matchLabels is empty", pdb))
	}
	for k, v := range sel {
		if labels[k] != v {
			out = append(out, fmt.Sprintf("%s: selector %s=%v does not match the worker pods (labels %v)", pdb, k, v, labels))
		}
	}
	replicas, _ := intAt(dep.obj, "spec", "replicas")
	maxU, hasMax := intAt(pdb.obj, "spec", "maxUnavailable")
	minA, hasMin := intAt(pdb.obj, "spec", "minAvailable")
	switch {
	case hasMax && (maxU < 1 || maxU >= replicas):
		out = append(out, fmt.Sprintf("%s: maxUnavailable %d must be between 1 and replicas-1 (%d)", pdb, maxU, replicas-1))
	case hasMin && (minA < 1 || minA >= replicas):
		out = append(out, fmt.Sprintf("%s: minAvailable %d must be between 1 and replicas-1 (%d)", pdb, minA, replicas-1))
	case !hasMax && !hasMin:
		out = append(out, fmt.Sprintf("%s: set maxUnavailable or minAvailable as an integer", pdb))
	}
	return out
}

// patchProblems checks strategic-merge patches (files under components/):
// a delete directive must carry the list's merge key, or it deletes
// nothing or, for volumeMounts, every entry.
func patchProblems(ms []manifest) []string {
	mergeKeys := map[string]string{"env": "name", "volumeMounts": "mountPath", "volumes": "name", "ports": "containerPort"}
	var out []string
	for _, ps := range podSpecs(ms) {
		if !strings.HasPrefix(ps.at.file, "components/") {
			continue
		}
		check := func(owner map[string]any, list string) {
			for _, e := range listAt(owner, list) {
				if isDelete(e) && str(e, mergeKeys[list]) == "" && get(e, mergeKeys[list]) == nil {
					out = append(out, fmt.Sprintf("%s: $patch: delete in %s needs its merge key %s", ps.at, list, mergeKeys[list]))
				}
			}
		}
		check(ps.spec, "volumes")
		for _, c := range ps.containers() {
			check(c, "env")
			check(c, "volumeMounts")
			check(c, "ports")
		}
	}
	return out
}

func allProblems(ms []manifest, known map[string]bool) []string {
	var out []string
	out = append(out, envNameProblems(ms, known)...)
	out = append(out, refProblems(ms)...)
	out = append(out, workerProblems(ms)...)
	out = append(out, pdbProblems(ms)...)
	out = append(out, patchProblems(ms)...)
	return out
}

func reportProblems(t *testing.T, problems []string) {
	t.Helper()
	for _, p := range problems {
		t.Error(p)
	}
}

// parseQuantity reads a Kubernetes memory quantity ("256Mi", "1G", "512").
func parseQuantity(s string) (int64, error) {
	if s == "" {
		return 0, fmt.Errorf("not set")
	}
	units := []struct {
		suffix string
		mult   int64
	}{
		{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
		{"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
	}
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("invalid quantity %q", s)
			}
			return v * u.mult, nil
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid quantity %q", s)
	}
	return v, nil
}

// parseGoBytes reads a GOMEMLIMIT value ("230MiB", "1GiB", "100000").
func parseGoBytes(s string) (int64, error) {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"B", 1}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("invalid size %q", s)
			}
			return v * u.mult, nil
		}
	}
	return strconv.ParseInt(s, 10, 64)
}
