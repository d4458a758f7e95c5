package deploy

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// kubeDir holds the Kubernetes manifests, relative to this package.
const kubeDir = "kubernetes"

// manifest is one YAML document of a file under kubeDir.
type manifest struct {
	file string // path relative to kubeDir, slash-separated
	obj  map[string]any
}

func (m manifest) kind() string { return str(m.obj, "kind") }
func (m manifest) name() string { return str(m.obj, "metadata", "name") }
func (m manifest) String() string {
	return fmt.Sprintf("%s (%s %s)", m.file, m.kind(), m.name())
}

// loadManifests parses every document of every *.yaml / *.yml file under
// kubeDir, sub-directories included.
func loadManifests(t *testing.T) []manifest {
	t.Helper()
	var out []manifest
	err := filepath.WalkDir(kubeDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !(strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(kubeDir, path)
		if err != nil {
			return err
		}
		docs, err := parseYAMLDocs(data)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		for _, doc := range docs {
			out = append(out, manifest{file: filepath.ToSlash(rel), obj: doc})
		}
		return nil
	})
	if err != nil {
		t.Fatalf("load manifests: %v", err)
	}
	if len(out) == 0 {
		t.Fatalf("no manifests under %s", kubeDir)
	}
	return out
}

// parseYAMLDocs decodes a multi-document YAML stream; empty documents are
// skipped, a document that is not a mapping is an error.
func parseYAMLDocs(data []byte) ([]map[string]any, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var out []map[string]any
	for i := 0; ; i++ {
		var doc any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if doc == nil {
			continue
		}
		m, ok := doc.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("document %d is a %T, not a mapping", i, doc)
		}
		out = append(out, m)
	}
}

// find returns the manifests of one kind, optionally with one name.
func find(ms []manifest, kind, name string) []manifest {
	var out []manifest
	for _, m := range ms {
		if m.kind() == kind && (name == "" || m.name() == name) {
			out = append(out, m)
		}
	}
	return out
}

// one returns the only manifest of kind and name in file, or fails.
func one(t *testing.T, ms []manifest, file, kind, name string) manifest {
	t.Helper()
	var got []manifest
	for _, m := range find(ms, kind, name) {
		if m.file == file {
			got = append(got, m)
		}
	}
	if len(got) != 1 {
		t.Fatalf("want exactly one %s %q in %s, found %d", kind, name, file, len(got))
	}
	return got[0]
}

// cloneManifests deep-copies manifests so a sub-test can break one.
func cloneManifests(ms []manifest) []manifest {
	out := make([]manifest, len(ms))
	for i, m := range ms {
		out[i] = manifest{file: m.file, obj: deepCopy(m.obj).(map[string]any)}
	}
	return out
}

func deepCopy(v any) any {
	switch v := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(v))
		for k, e := range v {
			m[k] = deepCopy(e)
		}
		return m
	case []any:
		l := make([]any, len(v))
		for i, e := range v {
			l[i] = deepCopy(e)
		}
		return l
	default:
		return v
	}
}

// get walks maps by key and lists by decimal index; nil when absent.
func get(v any, path ...string) any {
	for _, p := range path {
		switch c := v.(type) {
		case map[string]any:
			v = c[p]
		case []any:
			i, err := strconv.Atoi(p)
			if err != nil || i < 0 || i >= len(c) {
				return nil
			}
			v = c[i]
		default:
			return nil
		}
	}
	return v
}

func str(v any, path ...string) string {
	s, _ := get(v, path...).(string)
	return s
}

func mapAt(v any, path ...string) map[string]any {
	m, _ := get(v, path...).(map[string]any)
	return m
}

func listAt(v any, path ...string) []any {
	l, _ := get(v, path...).([]any)
	return l
}

// intAt reads an integer field; ok is false when it is absent or not an int.
func intAt(v any, path ...string) (int, bool) {
	n, ok := get(v, path...).(int)
	return n, ok
}

// scalar renders a YAML scalar the way Kubernetes would read it into a
// string field (ConfigMap data, env value).
func scalar(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	default:
		return fmt.Sprint(v)
	}
}

// podSpec is a pod spec found somewhere in a manifest (a workload's
// template, a bare Pod, or a patch).
type podSpec struct {
	at   manifest
	spec map[string]any
}

// podSpecs finds every map with a "containers" list, at any depth.
func podSpecs(ms []manifest) []podSpec {
	var out []podSpec
	var walk func(m manifest, v any)
	walk = func(m manifest, v any) {
		switch c := v.(type) {
		case map[string]any:
			if _, ok := c["containers"].([]any); ok {
				out = append(out, podSpec{at: m, spec: c})
				return
			}
			for _, k := range sortedKeys(c) {
				walk(m, c[k])
			}
		case []any:
			for _, e := range c {
				walk(m, e)
			}
		}
	}
	for _, m := range ms {
		walk(m, m.obj)
	}
	return out
}

// containers returns a pod spec's containers and init containers.
func (p podSpec) containers() []map[string]any {
	var out []map[string]any
	for _, key := range []string{"initContainers", "containers"} {
		for _, c := range listAt(p.spec, key) {
			if m, ok := c.(map[string]any); ok {
				out = append(out, m)
			}
		}
	}
	return out
}

// isDelete reports whether a list entry is a strategic-merge delete
// directive ($patch: delete).
func isDelete(entry any) bool { return str(entry, "$patch") == "delete" }

// dataKeys returns the keys a ConfigMap or Secret provides.
func dataKeys(m manifest) map[string]bool {
	keys := map[string]bool{}
	for _, field := range []string{"data", "stringData", "binaryData"} {
		for k := range mapAt(m.obj, field) {
			keys[k] = true
		}
	}
	return keys
}

// envFromKinds and keyRefKinds map a reference field to the kind it names.
var (
	envFromKinds = map[string]string{"configMapRef": "ConfigMap", "secretRef": "Secret"}
	keyRefKinds  = map[string]string{"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}
)

// dataValue returns the value of key in a ConfigMap or Secret as a
// container would see it (Secret data is base64).
func dataValue(m manifest, key string) string {
	if v, ok := mapAt(m.obj, "stringData")[key]; ok {
		return scalar(v)
	}
	v := scalar(get(m.obj, "data", key))
	if m.kind() == "Secret" {
		if b, err := base64.StdEncoding.DecodeString(v); err == nil {
			return string(b)
		}
	}
	return v
}

// containerEnv is the environment one container gets: envFrom sources, then
// env entries over them, as Kubernetes applies them. Values of references
// are read from the referenced objects among ms. problems lists references
// that do not resolve.
func containerEnv(ms []manifest, c map[string]any) (env map[string]string, problems []string) {
	env = map[string]string{}
	cname := str(c, "name")
	for _, from := range listAt(c, "envFrom") {
		prefix := str(from, "prefix")
		for _, ref := range sortedKeys(envFromKinds) {
			kind, name := envFromKinds[ref], str(from, ref, "name")
			if name == "" {
				continue
			}
			src := find(ms, kind, name)
			if len(src) == 0 {
				problems = append(problems, fmt.Sprintf("container %s: envFrom %s %q is not defined under %s", cname, kind, name, kubeDir))
				continue
			}
			for k := range dataKeys(src[0]) {
				env[prefix+k] = dataValue(src[0], k)
			}
		}
	}
	for _, e := range listAt(c, "env") {
		name := str(e, "name")
		if isDelete(e) {
			delete(env, name)
			continue
		}
		env[name] = scalar(get(e, "value"))
		for _, ref := range sortedKeys(keyRefKinds) {
			r := mapAt(e, "valueFrom", ref)
			if r == nil {
				continue
			}
			kind, srcName, key := keyRefKinds[ref], str(r, "name"), str(r, "key")
			src := find(ms, kind, srcName)
			switch {
			case len(src) == 0:
				problems = append(problems, fmt.Sprintf("container %s: env %s: %s %q is not defined under %s", cname, name, kind, srcName, kubeDir))
			case !dataKeys(src[0])[key]:
				problems = append(problems, fmt.Sprintf("container %s: env %s: %s %q has no key %q", cname, name, kind, srcName, key))
			default:
				env[name] = dataValue(src[0], key)
			}
		}
	}
	return env, problems
}

// envNames returns every variable name a container sets: env entries
// (delete directives excluded) and the keys of its envFrom sources.
func envNames(ms []manifest, c map[string]any) []string {
	env, _ := containerEnv(ms, c)
	return sortedKeys(env)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
