package deploy

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// No Docker engine runs where CI runs, so the image itself is not built
// here. What can be checked without one is the part most likely to go
// wrong: the builder stage's own go build command, run as written (with
// the ENV it sets), must produce a binary that is statically linked (the
// distroless/static image has no libc and no loader) and that runs.
func TestDockerBuildCommandMakesAStaticBinary(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the image is linux; an ELF check needs a linux build")
	}
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	build := ""
	for _, in := range parseDockerfile(string(data)) {
		if in.cmd == "FROM" && build != "" {
			break // only the builder stage
		}
		if in.cmd == "ENV" {
			env = append(env, strings.Fields(in.args)...)
		}
		if m := regexp.MustCompile(`go build .*`).FindString(in.args); in.cmd == "RUN" && m != "" {
			build = m
		}
	}
	if build == "" {
		t.Fatal("no go build in the builder stage")
	}
	out := t.TempDir()
	// The build writes to /out/worker in the image; here, to a temp dir.
	// The ldflags quoting is the shell's, so the shell runs it.
	cmd := exec.Command("/bin/sh", "-c", strings.ReplaceAll(build, "/out/worker", filepath.Join(out, "worker")))
	cmd.Dir = repoRoot
	cmd.Env = append(append(os.Environ(), env...), "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", build, err, b)
	}
	bin := filepath.Join(out, "worker")
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("binary has a %v program header: it is dynamically linked and will not start on distroless/static", p.Type)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("binary needs shared libraries %v", libs)
	}
	if f.Section(".symtab") != nil {
		t.Error("binary keeps its symbol table: -ldflags=\"-s -w\" did not apply")
	}
	help, err := exec.Command(bin, "help").CombinedOutput()
	if err != nil || !strings.Contains(string(help), "stop") {
		t.Errorf("worker help: %v\n%s", err, help)
	}
}
