package deploy

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/dlf-stop/worker/internal/config"
)

// kustomize renders the kustomization in dir as `kubectl kustomize` does.
func kustomize(dir string) ([]byte, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	res, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, err
	}
	return res.AsYaml()
}

func TestManifestsSetOnlyVariablesTheWorkerReads(t *testing.T) {
	ms := loadManifests(t)
	reportProblems(t, envNameProblems(ms, knownEnv(t)))

	// The check must have seen the variables: the ConfigMap through
	// envFrom and the file variables through env.
	_, c, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	names := strings.Join(envNames(ms, c), " ")
	for _, want := range []string{"NATS_URL", "SHUTDOWN_TIMEOUT", "STREAM_REPLICAS", "HUAWEICLOUD_SDK_SK_FILE", "NATS_PASSWORD_FILE"} {
		if !strings.Contains(names, want) {
			t.Errorf("worker container does not set %s; it sets %s", want, names)
		}
	}
}

func TestManifestReferencesResolve(t *testing.T) {
	reportProblems(t, refProblems(loadManifests(t)))
}

func TestWorkerDeployment(t *testing.T) {
	reportProblems(t, workerProblems(loadManifests(t)))
}

func TestPodDisruptionBudget(t *testing.T) {
	reportProblems(t, pdbProblems(loadManifests(t)))
}

func TestPatchDirectives(t *testing.T) {
	reportProblems(t, patchProblems(loadManifests(t)))
}

// placeholderRe matches the placeholders the manifests ship with.
var placeholderRe = regexp.MustCompile(`^REPLACE_WITH_[A-Z_]+$`)

// workerConfig loads the environment a container gets through
// config.FromEnv, as the worker does at start. Secret files are written to a
// temporary directory; with fill, placeholders get valid sample values.
func workerConfig(t *testing.T, ms []manifest, c map[string]any, fill bool) (config.Config, error) {
	t.Helper()
	env, problems := containerEnv(ms, c)
	if len(problems) > 0 {
		t.Fatalf("unresolved references: %v", problems)
	}
	dir := t.TempDir()
	secrets := find(ms, "Secret", credentialsName)
	for name, val := range env {
		if fill && placeholderRe.MatchString(val) {
			env[name] = "0123456789abcdef0123456789abcdef"
		}
		if !fileEnv(name) || val == "" {
			continue
		}
		if len(secrets) == 0 {
			t.Fatalf("%s points into Secret %s, which is not defined", name, credentialsName)
		}
		local := filepath.Join(dir, filepath.Base(val))
		if err := os.WriteFile(local, []byte(dataValue(secrets[0], path.Base(val))+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		env[name] = local
	}
	return config.FromEnv(func(name string) (string, bool) {
		v, ok := env[name]
		return v, ok
	})
}

// TestManifestsLoadAsWorkerConfig runs the worker's own configuration
// loading on what the manifests set, so a bad duration, a conflicting pair
// (X with X_FILE) or an unknown log level fails here, not at deploy time.
func TestManifestsLoadAsWorkerConfig(t *testing.T) {
	ms := loadManifests(t)
	_, c, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := workerConfig(t, ms, c, true)
	if err != nil {
		t.Fatalf("config.FromEnv rejects the manifests: %v", err)
	}
	if cfg.Subjects.StreamReplicas != 3 {
		t.Errorf("STREAM_REPLICAS = %d, want 3 (one per NATS node)", cfg.Subjects.StreamReplicas)
	}

	// The placeholders as shipped must stop the worker at start, naming the
	// variable, rather than send a bogus project id to DLF.
	_, err = workerConfig(t, ms, c, false)
	if err == nil || !strings.Contains(err.Error(), "HUAWEICLOUD_SDK_PROJECT_ID") {
		t.Errorf("unfilled placeholders: want a start-up error naming HUAWEICLOUD_SDK_PROJECT_ID, got %v", err)
	}
}

// componentEnv applies the env entries of the secret-env component's patch
// to the worker container (strategic merge by name) and returns the result.
func componentEnv(t *testing.T, ms []manifest) map[string]any {
	t.Helper()
	_, base, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	patch := one(t, ms, "components/secret-env/deployment-patch.yaml", "Deployment", workerName)
	var patchC map[string]any
	for _, c := range listAt(patch.obj, "spec", "template", "spec", "containers") {
		if str(c, "name") == workerContainer {
			patchC = c.(map[string]any)
		}
	}
	if patchC == nil {
		t.Fatalf("%s patches no container %q", patch, workerContainer)
	}
	merged := deepCopy(base).(map[string]any)
	var env []any
	patched := map[string]any{}
	for _, e := range listAt(patchC, "env") {
		patched[str(e, "name")] = e
	}
	for _, e := range listAt(merged, "env") {
		if p, ok := patched[str(e, "name")]; ok {
			delete(patched, str(e, "name"))
			if isDelete(p) {
				continue
			}
			e = p
		}
		env = append(env, e)
	}
	for _, e := range listAt(patchC, "env") {
		if _, ok := patched[str(e, "name")]; ok && !isDelete(e) {
			env = append(env, e)
		}
	}
	merged["env"] = env
	return merged
}

// TestSecretEnvComponent checks the optional component that hands the
// credentials over as variables from secretKeyRef: the worker accepts the
// result, and the patch leaves no X next to X_FILE.
func TestSecretEnvComponent(t *testing.T) {
	ms := loadManifests(t)
	c := componentEnv(t, ms)
	names := envNames(ms, c)
	set := map[string]bool{}
	for _, n := range names {
		set[n] = true
	}
	for _, n := range []string{"HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK", "NATS_PASSWORD"} {
		if !set[n] {
			t.Errorf("component does not set %s; sets %v", n, names)
		}
		if set[n+"_FILE"] {
			t.Errorf("component sets both %s and %s_FILE; the worker refuses that", n, n)
		}
	}
	if _, err := workerConfig(t, ms, c, true); err != nil {
		t.Errorf("config.FromEnv rejects the component's environment: %v", err)
	}
}

// TestKustomization checks the resource list: every manifest is deployed
// except the ones left out on purpose, and every listed file exists.
func TestKustomization(t *testing.T) {
	ms := loadManifests(t)
	k := one(t, ms, "kustomization.yaml", "Kustomization", "")
	if ns := str(k.obj, "namespace"); ns == "" {
		t.Error("kustomization.yaml sets no namespace")
	} else if len(find(ms, "Namespace", ns)) != 1 {
		t.Errorf("namespace %q is not defined by a Namespace manifest", ns)
	}
	// secret.yaml holds placeholders; applying it with the rest would reset
	// the real credentials on every deploy.
	leftOut := map[string]bool{"kustomization.yaml": true, "secret.yaml": true}
	listed := map[string]bool{}
	for _, r := range listAt(k.obj, "resources") {
		f := scalar(r)
		listed[f] = true
		if leftOut[f] {
			t.Errorf("kustomization.yaml lists %s, which must stay out of it", f)
		}
		if _, err := os.Stat(filepath.Join(kubeDir, f)); err != nil {
			t.Errorf("kustomization.yaml lists %s: %v", f, err)
		}
	}
	entries, err := os.ReadDir(kubeDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".yaml") && !leftOut[e.Name()] && !listed[e.Name()] {
			t.Errorf("%s is not listed in kustomization.yaml resources", e.Name())
		}
	}
	_, c, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	imageSet := false
	for _, img := range listAt(k.obj, "images") {
		imageSet = imageSet || str(img, "name") == str(c, "image")
	}
	if !imageSet {
		t.Errorf("kustomization.yaml images: has no entry for the container image %q", str(c, "image"))
	}
}

// TestKustomizeBuild renders the base and the base with the secret-env
// component with kustomize's own library (what `kubectl apply -k` runs),
// and runs the checks on the rendered objects.
func TestKustomizeBuild(t *testing.T) {
	ms := loadManifests(t)
	known := knownEnv(t)
	secrets := find(ms, "Secret", credentialsName)

	abs, err := filepath.Abs(kubeDir)
	if err != nil {
		t.Fatal(err)
	}
	// Kustomize takes relative paths only.
	overlay := t.TempDir()
	rel, err := filepath.Rel(overlay, abs)
	if err != nil {
		t.Fatal(err)
	}
	kust := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n",
		filepath.ToSlash(rel), filepath.ToSlash(filepath.Join(rel, "components", "secret-env")))
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(kust), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, dir string }{{"base", abs}, {"secret-env", overlay}} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := kustomize(tc.dir)
			if err != nil {
				t.Fatalf("kustomize build %s: %v", tc.dir, err)
			}
			docs, err := parseYAMLDocs(out)
			if err != nil {
				t.Fatal(err)
			}
			rendered := append([]manifest(nil), secrets...)
			for _, d := range docs {
				rendered = append(rendered, manifest{file: "rendered/" + tc.name, obj: d})
			}
			reportProblems(t, allProblems(rendered, known))
			_, c, err := workerDeployment(rendered)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := workerConfig(t, rendered, c, true); err != nil {
				t.Errorf("config.FromEnv rejects the rendered environment: %v", err)
			}
			for _, d := range docs {
				if ns := str(d, "metadata", "namespace"); d["kind"] != "Namespace" && ns != "dlf-stop" {
					t.Errorf("rendered %s %s is in namespace %q, want dlf-stop", d["kind"], str(d, "metadata", "name"), ns)
				}
			}
		})
	}
}

// TestChecksCatchBadManifests breaks one thing at a time in a copy of the
// manifests and expects the checks to name it.
func TestChecksCatchBadManifests(t *testing.T) {
	ms := loadManifests(t)
	known := knownEnv(t)
	if p := allProblems(ms, known); len(p) > 0 {
		t.Fatalf("manifests as shipped have problems: %v", p)
	}

	container := func(ms []manifest) map[string]any {
		_, c, err := workerDeployment(ms)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	podOf := func(ms []manifest) map[string]any {
		dep, _, _ := workerDeployment(ms)
		return mapAt(dep.obj, "spec", "template", "spec")
	}
	configMap := func(ms []manifest) map[string]any {
		return mapAt(one(t, ms, "configmap.yaml", "ConfigMap", workerName).obj, "data")
	}
	envEntry := func(ms []manifest, name string) map[string]any {
		for _, e := range listAt(container(ms), "env") {
			if str(e, "name") == name {
				return e.(map[string]any)
			}
		}
		t.Fatalf("no env %s", name)
		return nil
	}

	cases := []struct {
		name   string
		mutate func(ms []manifest)
		want   string
	}{
		{"misspelt ConfigMap key", func(ms []manifest) {
			configMap(ms)["WORKER_CONCURENCY"] = "8"
		}, "sets WORKER_CONCURENCY, which the worker does not read"},
		{"unknown env entry", func(ms []manifest) {
			c := container(ms)
			c["env"] = append(listAt(c, "env"), map[string]any{"name": "DLF_PASSWORD", "value": "x"})
		}, "sets DLF_PASSWORD"},
		{"unknown key of a Secret loaded with envFrom", func(ms []manifest) {
			c := container(ms)
			c["envFrom"] = append(listAt(c, "envFrom"), map[string]any{"secretRef": map[string]any{"name": credentialsName}})
		}, "sets nats-password"},
		{"envFrom of an undefined ConfigMap", func(ms []manifest) {
			mapAt(container(ms), "envFrom", "0", "configMapRef")["name"] = "nope"
		}, `ConfigMap "nope" is not defined`},
		{"secretKeyRef to a missing key", func(ms []manifest) {
			c := container(ms)
			c["env"] = append(listAt(c, "env"), map[string]any{"name": "DLF_AUTH_TOKEN", "valueFrom": map[string]any{
				"secretKeyRef": map[string]any{"name": credentialsName, "key": "token"}}})
		}, `has no key "token"`},
		{"file variable outside the Secret mount", func(ms []manifest) {
			envEntry(ms, "HUAWEICLOUD_SDK_SK_FILE")["value"] = "/etc/sk"
		}, "is not under any volumeMount"},
		{"file variable naming a missing key", func(ms []manifest) {
			envEntry(ms, "HUAWEICLOUD_SDK_SK_FILE")["value"] = "/var/run/secrets/dlf-stop-worker/secret-key"
		}, `has no key "secret-key"`},
		{"Secret mounted with subPath", func(ms []manifest) {
			mapAt(container(ms), "volumeMounts", "0")["subPath"] = "sk"
		}, "uses subPath"},
		{"liveness on the wrong path", func(ms []manifest) {
			mapAt(container(ms), "livenessProbe", "httpGet")["path"] = "/readyz"
		}, `livenessProbe: path "/readyz"`},
		{"readiness on another port", func(ms []manifest) {
			mapAt(container(ms), "readinessProbe", "httpGet")["port"] = 9090
		}, "readinessProbe: port 9090"},
		{"no readiness probe", func(ms []manifest) {
			delete(container(ms), "readinessProbe")
		}, "readinessProbe: want an httpGet probe"},
		{"http port renamed", func(ms []manifest) {
			mapAt(container(ms), "ports", "0")["name"] = "metrics"
		}, "no port named http"},
		{"HTTP_ADDR on another port", func(ms []manifest) {
			configMap(ms)["HTTP_ADDR"] = ":9090"
		}, `HTTP_ADDR ":9090" listens on 9090`},
		{"grace period equal to SHUTDOWN_TIMEOUT", func(ms []manifest) {
			podOf(ms)["terminationGracePeriodSeconds"] = 20
		}, "terminationGracePeriodSeconds (20s) must exceed SHUTDOWN_TIMEOUT (20s)"},
		{"SHUTDOWN_TIMEOUT raised past the grace period", func(ms []manifest) {
			configMap(ms)["SHUTDOWN_TIMEOUT"] = "1m"
		}, "must exceed SHUTDOWN_TIMEOUT (1m0s)"},
		{"grace period left to the default", func(ms []manifest) {
			delete(podOf(ms), "terminationGracePeriodSeconds")
			configMap(ms)["SHUTDOWN_TIMEOUT"] = "30s"
		}, "terminationGracePeriodSeconds (30s) must exceed"},
		{"SHUTDOWN_TIMEOUT not a duration", func(ms []manifest) {
			configMap(ms)["SHUTDOWN_TIMEOUT"] = "20"
		}, `SHUTDOWN_TIMEOUT "20"`},
		{"container allows root", func(ms []manifest) {
			mapAt(container(ms), "securityContext")["runAsNonRoot"] = false
		}, "runAsNonRoot must be true"},
		{"runAsNonRoot nowhere", func(ms []manifest) {
			delete(mapAt(container(ms), "securityContext"), "runAsNonRoot")
			delete(mapAt(podOf(ms), "securityContext"), "runAsNonRoot")
		}, "runAsNonRoot must be true"},
		{"runs as uid 0", func(ms []manifest) {
			mapAt(podOf(ms), "securityContext")["runAsUser"] = 0
		}, "runAsUser must not be 0"},
		{"writable root filesystem", func(ms []manifest) {
			mapAt(container(ms), "securityContext")["readOnlyRootFilesystem"] = false
		}, "readOnlyRootFilesystem must be true"},
		{"capabilities kept", func(ms []manifest) {
			mapAt(container(ms), "securityContext", "capabilities")["drop"] = []any{"NET_RAW"}
		}, "capabilities.drop must contain ALL"},
		{"privilege escalation allowed", func(ms []manifest) {
			delete(mapAt(container(ms), "securityContext"), "allowPrivilegeEscalation")
		}, "allowPrivilegeEscalation must be false"},
		{"no memory limit", func(ms []manifest) {
			delete(mapAt(container(ms), "resources", "limits"), "memory")
		}, "resources.limits.memory"},
		{"GOMEMLIMIT above the memory limit", func(ms []manifest) {
			envEntry(ms, "GOMEMLIMIT")["value"] = "1GiB"
		}, `GOMEMLIMIT "1GiB" must be below`},
		{"single replica", func(ms []manifest) {
			dep, _, _ := workerDeployment(ms)
			mapAt(dep.obj, "spec")["replicas"] = 1
		}, "replicas must be at least 2"},
		{"scrape annotation on another port", func(ms []manifest) {
			dep, _, _ := workerDeployment(ms)
			mapAt(dep.obj, "spec", "template", "metadata", "annotations")["prometheus.io/port"] = "9090"
		}, `prometheus.io/port "9090"`},
		{"PDB selecting other pods", func(ms []manifest) {
			pdb := find(ms, "PodDisruptionBudget", "")[0]
			mapAt(pdb.obj, "spec", "selector", "matchLabels")["app.kubernetes.io/name"] = "other"
		}, "does not match the worker pods"},
		{"PDB allowing every pod down", func(ms []manifest) {
			pdb := find(ms, "PodDisruptionBudget", "")[0]
			mapAt(pdb.obj, "spec")["maxUnavailable"] = 3
		}, "maxUnavailable 3"},
		{"patch deleting a mount by name", func(ms []manifest) {
			patch := one(t, ms, "components/secret-env/deployment-patch.yaml", "Deployment", workerName)
			vm := mapAt(patch.obj, "spec", "template", "spec", "containers", "0", "volumeMounts", "0")
			delete(vm, "mountPath")
			vm["name"] = "credentials"
		}, "needs its merge key mountPath"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bad := cloneManifests(ms)
			tc.mutate(bad)
			problems := allProblems(bad, known)
			for _, p := range problems {
				if strings.Contains(p, tc.want) {
					return
				}
			}
			t.Errorf("no problem mentions %q; got %q", tc.want, problems)
		})
	}
	// The copies above must not have touched the originals.
	if p := allProblems(ms, known); len(p) > 0 {
		t.Fatalf("mutations leaked into the loaded manifests: %v", p)
	}
}

// TestComponentCatchesLeftoverFileVariable: a patch that adds X but forgets
// to delete X_FILE must fail (the worker refuses both).
func TestComponentCatchesLeftoverFileVariable(t *testing.T) {
	ms := cloneManifests(loadManifests(t))
	patch := one(t, ms, "components/secret-env/deployment-patch.yaml", "Deployment", workerName)
	c := mapAt(patch.obj, "spec", "template", "spec", "containers", "0")
	var kept []any
	for _, e := range listAt(c, "env") {
		if str(e, "name") != "HUAWEICLOUD_SDK_SK_FILE" {
			kept = append(kept, e)
		}
	}
	c["env"] = kept
	merged := componentEnv(t, ms)
	_, err := workerConfig(t, ms, merged, true)
	if err == nil || !strings.Contains(err.Error(), "HUAWEICLOUD_SDK_SK") {
		t.Errorf("want the worker to refuse SK and SK_FILE together, got %v", err)
	}
}
