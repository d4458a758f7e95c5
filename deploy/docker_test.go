package deploy

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

const (
	dockerfilePath   = "Dockerfile"
	dockerignorePath = "../.dockerignore"
	repoRoot         = ".."
)

// dockerInstr is one Dockerfile instruction, continuation lines joined.
type dockerInstr struct {
	cmd  string // upper case
	args string
}

func parseDockerfile(text string) []dockerInstr {
	var out []dockerInstr
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		cmd, args, _ := strings.Cut(line, " ")
		out = append(out, dockerInstr{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)})
	}
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") {
			continue
		}
		if rest, ok := strings.CutSuffix(strings.TrimRight(line, " \t"), "\\"); ok {
			cur.WriteString(rest + " ")
			continue
		}
		cur.WriteString(line)
		flush()
	}
	flush()
	return out
}

// goModVersion returns the go directive of the module ("1.26.8").
func goModVersion(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go\s+(\S+)`).FindSubmatch(data)
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	return string(m[1])
}

// dockerfileProblems checks the build: a Go builder at least as new as
// go.mod's minor version, a static trimmed build of ./cmd/worker with a
// module cache mount, and a final image that runs /worker as a numeric
// non-root user with the http port exposed.
func dockerfileProblems(text, goVersion string, httpPort int) []string {
	var out []string
	bad := func(format string, args ...any) {
		out = append(out, dockerfilePath+": "+fmt.Sprintf(format, args...))
	}
	instrs := parseDockerfile(text)
	args := map[string]string{}
	expand := func(s string) string {
		return regexp.MustCompile(`\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?`).ReplaceAllStringFunc(s, func(ref string) string {
			name := strings.Trim(ref, "${}")
			if v, ok := args[name]; ok {
				return v
			}
			return ref
		})
	}
	type stage struct {
		from  string
		instr []dockerInstr
	}
	var stages []stage
	for _, in := range instrs {
		switch {
		case in.cmd == "ARG" && len(stages) == 0:
			if name, val, ok := strings.Cut(in.args, "="); ok {
				args[name] = val
			}
		case in.cmd == "FROM":
			fields := strings.Fields(in.args)
			image := ""
			for _, f := range fields {
				if !strings.HasPrefix(f, "--") {
					image = expand(f)
					break
				}
			}
			stages = append(stages, stage{from: image})
		case len(stages) > 0:
			stages[len(stages)-1].instr = append(stages[len(stages)-1].instr, in)
		}
	}
	if len(stages) < 2 {
		bad("want a multi-stage build (builder, then runtime), found %d stage(s)", len(stages))
		return out
	}

	// The builder.
	build := stages[0]
	minor := strings.Join(strings.SplitN(goVersion, ".", 3)[:2], ".")
	if !strings.HasPrefix(build.from, "golang:"+minor) {
		bad("builder image %q, want golang:%s (go.mod says go %s)", build.from, minor, goVersion)
	}
	var buildText strings.Builder
	for _, in := range build.instr {
		buildText.WriteString(in.cmd + " " + in.args + "\n")
	}
	bt := buildText.String()
	goBuild := regexp.MustCompile(`go build [^\n]*`).FindString(bt)
	switch {
	case goBuild == "":
		bad("the builder runs no go build")
	default:
		for _, want := range []string{"-trimpath", `-ldflags="-s -w"`, "-o /out/worker", "./cmd/worker"} {
			if !strings.Contains(goBuild, want) {
				bad("go build lacks %s: %s", want, goBuild)
			}
		}
	}
	if !regexp.MustCompile(`(ENV|RUN)\b[^\n]*\bCGO_ENABLED=0`).MatchString(bt) {
		bad("the build does not set CGO_ENABLED=0 (the runtime image has no libc)")
	}
	if !strings.Contains(bt, "--mount=type=cache,target=/go/pkg/mod") {
		bad("no module cache mount (--mount=type=cache,target=/go/pkg/mod)")
	}

	// The runtime image.
	final := stages[len(stages)-1]
	if !strings.HasPrefix(final.from, "gcr.io/distroless/static") && final.from != "scratch" {
		bad("runtime image %q, want gcr.io/distroless/static-* or scratch", final.from)
	}
	var user, entrypoint, copied string
	exposed := false
	for _, in := range final.instr {
		switch in.cmd {
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "EXPOSE":
			for _, p := range strings.Fields(in.args) {
				exposed = exposed || strings.TrimSuffix(p, "/tcp") == strconv.Itoa(httpPort)
			}
		case "COPY":
			if strings.Contains(in.args, "--from=") && strings.Contains(in.args, "/out/worker") {
				copied = in.args
			}
		}
	}
	uid, err := strconv.Atoi(strings.SplitN(user, ":", 2)[0])
	switch {
	case user == "":
		bad("the runtime stage sets no USER")
	case err != nil:
		bad("USER %q is not numeric; runAsNonRoot cannot verify a name", user)
	case uid == 0:
		bad("USER %q is root", user)
	}
	if entrypoint != `["/worker"]` {
		bad(`ENTRYPOINT %s, want ["/worker"] (exec form)`, entrypoint)
	}
	if !exposed {
		bad("does not EXPOSE the http port %d", httpPort)
	}
	if !strings.HasSuffix(copied, " /worker") {
		bad("the runtime stage does not copy /out/worker to /worker")
	}
	return out
}

func workerHTTPPort(t *testing.T) int {
	t.Helper()
	_, c, err := workerDeployment(loadManifests(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range listAt(c, "ports") {
		if str(p, "name") == "http" {
			n, _ := intAt(p, "containerPort")
			return n
		}
	}
	t.Fatal("no http port")
	return 0
}

func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	reportProblems(t, dockerfileProblems(string(data), goModVersion(t), workerHTTPPort(t)))
}

func TestDockerfileChecksCatchBadBuilds(t *testing.T) {
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	text, goVersion, port := string(data), goModVersion(t), workerHTTPPort(t)
	if p := dockerfileProblems(text, goVersion, port); len(p) > 0 {
		t.Fatalf("Dockerfile as shipped has problems: %v", p)
	}
	cases := []struct{ name, old, new, want string }{
		{"old Go", "ARG GO_VERSION=1.26", "ARG GO_VERSION=1.22", "builder image"},
		{"cgo on", "ENV CGO_ENABLED=0", "ENV CGO_ENABLED=1", "CGO_ENABLED=0"},
		{"no trimpath", "-trimpath ", "", "lacks -trimpath"},
		{"other package", "./cmd/worker", "./cmd/other", "lacks ./cmd/worker"},
		{"no module cache mount", "--mount=type=cache,target=/go/pkg/mod", "--mount=type=cache,target=/tmp/mod", "no module cache mount"},
		{"root user", "USER 65532:65532", "USER 0", `USER "0" is root`},
		{"named user", "USER 65532:65532", "USER nonroot", "not numeric"},
		{"no user", "USER 65532:65532", "", "sets no USER"},
		{"shell entrypoint", `ENTRYPOINT ["/worker"]`, "ENTRYPOINT /worker", "exec form"},
		{"other port", "EXPOSE 8080", "EXPOSE 9090", "does not EXPOSE"},
		{"full base image", "FROM gcr.io/distroless/static-debian12:nonroot", "FROM debian:12", "runtime image"},
		{"single stage", "FROM gcr.io/distroless/static-debian12:nonroot", "", "multi-stage"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(text, tc.old) {
				t.Fatalf("Dockerfile has no %q to change", tc.old)
			}
			problems := dockerfileProblems(strings.ReplaceAll(text, tc.old, tc.new), goVersion, port)
			for _, p := range problems {
				if strings.Contains(p, tc.want) {
					return
				}
			}
			t.Errorf("no problem mentions %q; got %q", tc.want, problems)
		})
	}
}

// ignoreRule is one .dockerignore line.
type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

// parseDockerignore reads .dockerignore patterns the way Docker matches
// them: paths relative to the context root, '*' within one segment, '**'
// across segments, a pattern also excluding everything under a matched
// directory, the last matching line winning ('!' re-includes).
func parseDockerignore(text string) []ignoreRule {
	var out []ignoreRule
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		negate := strings.HasPrefix(line, "!")
		line = strings.TrimPrefix(line, "!")
		line = strings.TrimPrefix(filepath.ToSlash(filepath.Clean(line)), "/")
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(line); i++ {
			switch c := line[i]; {
			case strings.HasPrefix(line[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(line[i:], "**"):
				re.WriteString(".*")
				i++
			case c == '*':
				re.WriteString("[^/]*")
			case c == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(string(c)))
			}
		}
		re.WriteString("(/.*)?$")
		out = append(out, ignoreRule{re: regexp.MustCompile(re.String()), negate: negate})
	}
	return out
}

func ignored(rules []ignoreRule, path string) bool {
	excluded := false
	for _, r := range rules {
		if r.re.MatchString(path) {
			excluded = !r.negate
		}
	}
	return excluded
}

// buildInputs lists the files the image build needs from the context:
// go.mod, go.sum and every file under cmd/ and internal/ except tests and
// test data (non-Go files there may be embedded).
func buildInputs(t *testing.T) []string {
	t.Helper()
	inputs := []string{"go.mod", "go.sum", "cmd/worker/main.go"}
	for _, dir := range []string{"cmd", "internal"} {
		err := filepath.WalkDir(filepath.Join(repoRoot, dir), func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				if os.IsNotExist(err) {
					return nil
				}
				return err
			}
			if d.IsDir() && d.Name() == "testdata" {
				return filepath.SkipDir
			}
			if d.IsDir() || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			rel, err := filepath.Rel(repoRoot, path)
			if err != nil {
				return err
			}
			inputs = append(inputs, filepath.ToSlash(rel))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return inputs
}

// dockerignoreProblems: every build input stays in the context; secrets
// and VCS data stay out.
func dockerignoreProblems(text string, inputs []string) []string {
	rules := parseDockerignore(text)
	var out []string
	for _, in := range inputs {
		if ignored(rules, in) {
			out = append(out, fmt.Sprintf(".dockerignore excludes %s, which the build needs", in))
		}
	}
	for _, secret := range []string{".git/config", ".env", "internal/x/.env", "deploy/kubernetes/secret.yaml", "nats.creds"} {
		if !ignored(rules, secret) {
			out = append(out, fmt.Sprintf(".dockerignore lets %s into the build context", secret))
		}
	}
	return out
}

func TestDockerignore(t *testing.T) {
	data, err := os.ReadFile(dockerignorePath)
	if err != nil {
		t.Fatal(err)
	}
	reportProblems(t, dockerignoreProblems(string(data), buildInputs(t)))
}

func TestDockerignoreChecksCatchBadPatterns(t *testing.T) {
	data, err := os.ReadFile(dockerignorePath)
	if err != nil {
		t.Fatal(err)
	}
	inputs := buildInputs(t)
	cases := []struct{ name, add, want string }{
		{"internal excluded", "internal", "excludes internal/"},
		{"all Go files excluded", "**/*.go", "excludes cmd/worker/main.go"},
		{"go.sum excluded", "go.sum", "excludes go.sum"},
		{"git re-included", "!.git", "lets .git/config"},
		{"secret re-included", "!deploy/kubernetes/secret.yaml", "lets deploy/kubernetes/secret.yaml"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			problems := dockerignoreProblems(string(data)+"\n"+tc.add+"\n", inputs)
			for _, p := range problems {
				if strings.Contains(p, tc.want) {
					return
				}
			}
			t.Errorf("no problem mentions %q; got %q", tc.want, problems)
		})
	}
}

// TestDockerBuildTarget: the package the Dockerfile builds is a main
// package.
func TestDockerBuildTarget(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot, "cmd", "worker", "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if regexp.MustCompile(`(?m)^package main\b`).Match(data) {
			return
		}
	}
	t.Errorf("cmd/worker has no package main (files %v); the Dockerfile builds ./cmd/worker", files)
}
