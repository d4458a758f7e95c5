package secretfile

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// withoutFSNotify leaves the poll as the only way to notice changes.
func withoutFSNotify() Option {
	return func(o *options) { o.noFSNotify = true }
}

const waitTimeout = 5 * time.Second

// waitFor polls cond until it holds or waitTimeout passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
		}
		<-tick.C
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// mode is how changes are noticed.
type mode struct {
	name string
	opts []Option
}

var modes = []mode{
	// The poll is left at its 10s default, beyond waitTimeout: only fsnotify
	// can make these tests pass.
	{name: "fsnotify"},
	{name: "poll", opts: []Option{withoutFSNotify(), WithPollInterval(10 * time.Millisecond)}},
}

// harness is one watched file with its logs and change count.
type harness struct {
	t       *testing.T
	v       *Value
	logs    *observer.ObservedLogs
	changes atomic.Int64
	secrets []string // every value the test wrote; none may be logged
}

// start watches path. At cleanup it closes the Value and checks that no log
// entry carries a secret.
func start(t *testing.T, path string, secrets []string, opts ...Option) *harness {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	h := &harness{t: t, logs: logs, secrets: secrets}
	opts = append(opts, WithOnChange(func() { h.changes.Add(1) }))
	v, err := Watch(t.Context(), path, zap.New(core), opts...)
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	h.v = v
	t.Cleanup(func() {
		v.Close()
		assertNoSecretInLogs(t, logs, h.secrets)
	})
	return h
}

func (h *harness) waitChanges(n int64) {
	h.t.Helper()
	waitFor(h.t, fmt.Sprintf("%d changes", n), func() bool { return h.changes.Load() >= n })
}

func (h *harness) waitWarning(substr string) {
	h.t.Helper()
	waitFor(h.t, "a re-read warning containing "+substr, func() bool {
		for _, e := range h.logs.FilterLevelExact(zapcore.WarnLevel).All() {
			if strings.Contains(fmt.Sprint(e.ContextMap()), substr) {
				return true
			}
		}
		return false
	})
}

func (h *harness) assert(wantValue string, wantVersion uint64) {
	h.t.Helper()
	if got := h.v.Get(); got != wantValue {
		h.t.Errorf("Get() = %q, want %q", got, wantValue)
	}
	if got := h.v.Version(); got != wantVersion {
		h.t.Errorf("Version() = %d, want %d", got, wantVersion)
	}
}

func assertNoSecretInLogs(t *testing.T, logs *observer.ObservedLogs, secrets []string) {
	t.Helper()
	for _, e := range logs.All() {
		text := e.Message + " " + fmt.Sprint(e.ContextMap())
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("log entry %q leaks a secret", text)
			}
		}
	}
}

// layout creates the initial file holding value under dir and returns the
// path to watch and a function that replaces the value.
type layout func(t *testing.T, dir, value string) (path string, change func(value string))

// inPlace truncates and rewrites the file.
func inPlace(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) { writeFile(t, path, v+"\n") }
}

// renameOver writes a temporary file and renames it over the path.
func renameOver(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) {
		tmp := filepath.Join(dir, ".sk.tmp")
		writeFile(t, tmp, v+"\r\n")
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
}

// kubernetes mimics the kubelet's atomic writer:
// dir/..2024_x/sk, dir/..data -> ..2024_x, dir/sk -> ..data/sk.
func kubernetes(t *testing.T, dir, value string) (string, func(string)) {
	return kubernetesSwap(t, dir, value, true)
}

// kubernetesKeepOld swaps ..data but leaves the old generation in place, so
// the file the path used to resolve to never changes: only the directory
// watch sees the swap.
func kubernetesKeepOld(t *testing.T, dir, value string) (string, func(string)) {
	return kubernetesSwap(t, dir, value, false)
}

func kubernetesSwap(t *testing.T, dir, value string, removeOld bool) (string, func(string)) {
	newGeneration := func(v string) string {
		gen, err := os.MkdirTemp(dir, "..2024_")
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(gen, "sk"), v+"\n")
		return filepath.Base(gen)
	}
	data := filepath.Join(dir, "..data")
	if err := os.Symlink(newGeneration(value), data); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sk")
	if err := os.Symlink(filepath.Join("..data", "sk"), path); err != nil {
		t.Fatal(err)
	}
	return path, func(v string) {
		old, err := os.Readlink(data)
		if err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(newGeneration(v), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, data); err != nil {
			t.Fatal(err)
		}
		if !removeOld {
			return
		}
		if err := os.RemoveAll(filepath.Join(dir, old)); err != nil {
			t.Fatal(err)
		}
	}
}

// symlinkElsewhere watches a symlink to a file in another directory that is
// rewritten in place there.
func symlinkElsewhere(t *testing.T, dir, value string) (string, func(string)) {
	for _, d := range []string{"real", "mount"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	real := filepath.Join(dir, "real", "secret")
	writeFile(t, real, value+"\n")
	path := filepath.Join(dir, "mount", "sk")
	if err := os.Symlink(real, path); err != nil {
		t.Fatal(err)
	}
	return path, func(v string) { writeFile(t, real, v+"\n") }
}

// removeRecreate removes the file, waits until the watcher has seen it gone
// and kept the old value, then creates it again.
func removeRecreate(t *testing.T, dir, value string) (string, func(string)) {
	path := filepath.Join(dir, "sk")
	writeFile(t, path, value+"\n")
	return path, func(v string) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		writeFile(t, path, v+"\n")
	}
}

func TestWatchFollowsChanges(t *testing.T) {
	layouts := []struct {
		name   string
		layout layout
	}{
		{"in-place rewrite", inPlace},
		{"atomic rename-over", renameOver},
		{"kubernetes symlink swap", kubernetes},
		{"kubernetes symlink swap keeping old generation", kubernetesKeepOld},
		{"symlink to another directory", symlinkElsewhere},
		{"removed then re-created", removeRecreate},
	}
	for _, m := range modes {
		for _, l := range layouts {
			t.Run(m.name+"/"+l.name, func(t *testing.T) {
				secrets := []string{"sk-one-7f3a9c", "sk-two-b81e44", "sk-three-0d5c2f"}
				path, change := l.layout(t, t.TempDir(), secrets[0])
				h := start(t, path, secrets, m.opts...)
				h.assert(secrets[0], 1)

				change(secrets[1])
				h.waitChanges(1)
				h.assert(secrets[1], 2)

				// A second change proves the watch survived the first
				// (for Kubernetes, the old generation directory is gone).
				change(secrets[2])
				h.waitChanges(2)
				h.assert(secrets[2], 3)
			})
		}
	}
}

func TestRemovedFileKeepsLastGoodValue(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			secrets := []string{"tok-alpha-55e1", "tok-beta-93ab"}
			path := filepath.Join(t.TempDir(), "token")
			writeFile(t, path, secrets[0])
			h := start(t, path, secrets, m.opts...)

			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			h.waitWarning("no such file or directory")
			h.assert(secrets[0], 1)

			writeFile(t, path, secrets[1])
			h.waitChanges(1)
			h.assert(secrets[1], 2)
			waitFor(t, "a recovery log", func() bool {
				return h.logs.FilterMessage("secret file: readable again").Len() > 0
			})
		})
	}
}

func TestDirectoryRemovedAndRecreated(t *testing.T) {
	// The directory watch dies with the directory; the poll still converges
	// and restores the watch.
	dir := filepath.Join(t.TempDir(), "secrets")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sk")
	writeFile(t, path, "dir-old-4242")
	h := start(t, path, []string{"dir-old-4242", "dir-new-9191", "dir-newer-7373"},
		WithPollInterval(20*time.Millisecond))

	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	h.waitWarning("no such file or directory")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, "dir-new-9191")
	h.waitChanges(1)
	h.assert("dir-new-9191", 2)

	writeFile(t, path, "dir-newer-7373")
	h.waitChanges(2)
	h.assert("dir-newer-7373", 3)
}

func TestEmptyRewriteKeepsLastGoodValue(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			secrets := []string{"pw-first-c0ffee", "pw-second-decaf0"}
			path := filepath.Join(t.TempDir(), "password")
			writeFile(t, path, secrets[0]+"\n")
			h := start(t, path, secrets, m.opts...)

			writeFile(t, path, " \r\n\n")
			h.waitWarning(ErrEmpty.Error())
			h.assert(secrets[0], 1)
			if n := h.changes.Load(); n != 0 {
				t.Errorf("OnChange called %d times for an empty file", n)
			}

			writeFile(t, path, secrets[1]+"\n")
			h.waitChanges(1)
			h.assert(secrets[1], 2)
		})
	}
}

func TestUnchangedContentIsNotAChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "same-value\n")
	h := start(t, path, []string{"same-value"}, withoutFSNotify(), WithPollInterval(time.Millisecond))

	// Rewrite with the same content but a different trailing newline, then
	// change it: the only change counted is the real one.
	writeFile(t, path, "same-value\r\n")
	writeFile(t, path, "other-value")
	h.waitChanges(1)
	h.assert("other-value", 2)
}

func TestInitialRead(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    string
	}{
		{"plain", "s3cr3t", "s3cr3t"},
		{"newline", "s3cr3t\n", "s3cr3t"},
		{"crlf", "s3cr3t\r\n", "s3cr3t"},
		{"trailing blanks", "s3cr3t \t\n\n", "s3cr3t"},
		{"leading and inner blanks kept", "  s3 cr3t\n", "  s3 cr3t"},
		{"inner newline kept", "line1\nline2\n", "line1\nline2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "secret")
			writeFile(t, path, tt.content)
			h := start(t, path, nil)
			h.assert(tt.want, 1)
		})
	}
}

func TestWatchStartErrors(t *testing.T) {
	dir := t.TempDir()
	const content = "do-not-print-me"

	missing := filepath.Join(dir, "missing")
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, "\n \r\n")
	large := filepath.Join(dir, "large")
	writeFile(t, large, strings.Repeat(content, maxSize/len(content)+1))

	tests := []struct {
		name   string
		path   string
		wantIs error
	}{
		{"missing", missing, fs.ErrNotExist},
		{"missing directory", filepath.Join(dir, "nodir", "sk"), fs.ErrNotExist},
		{"empty after trimming", empty, ErrEmpty},
		{"too large", large, ErrTooLarge},
		{"directory", dir, nil},
	}
	for _, tt := range tests {
		for _, m := range modes {
			t.Run(tt.name+"/"+m.name, func(t *testing.T) {
				v, err := Watch(t.Context(), tt.path, zap.NewNop(), m.opts...)
				if err == nil {
					v.Close()
					t.Fatal("Watch succeeded, want an error")
				}
				if v != nil {
					t.Errorf("Watch returned a Value with an error")
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Errorf("error %v, want errors.Is %v", err, tt.wantIs)
				}
				if !strings.Contains(err.Error(), tt.path) {
					t.Errorf("error %q does not name the path %q", err, tt.path)
				}
				if strings.Contains(err.Error(), content) {
					t.Errorf("error %q contains file content", err)
				}
			})
		}
	}
}

func TestWatchInvalidArguments(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "x")
	tests := []struct {
		name string
		path string
		opts []Option
	}{
		{"empty path", "", nil},
		{"zero poll interval", path, []Option{WithPollInterval(0)}},
		{"negative poll interval", path, []Option{WithPollInterval(-time.Second)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := Watch(t.Context(), tt.path, nil, tt.opts...)
			if err == nil {
				v.Close()
				t.Fatal("Watch succeeded, want an error")
			}
		})
	}
}

func TestCloseStopsGoroutines(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "sk")
			writeFile(t, path, "value-1")
			v, err := Watch(t.Context(), path, zap.NewNop(), m.opts...)
			if err != nil {
				t.Fatal(err)
			}

			// Idempotent and safe to call concurrently.
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(v.Close)
			}
			wg.Wait()
			v.Close()

			goleak.VerifyNone(t)
			if got := v.Get(); got != "value-1" {
				t.Errorf("Get() after Close = %q, want the last value", got)
			}
		})
	}
}

func TestContextCancelStopsWatching(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "value-1")
	ctx, cancel := context.WithCancel(t.Context())
	v, err := Watch(ctx, path, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	waitFor(t, "the watcher to stop", func() bool {
		select {
		case <-v.done:
			return true
		default:
			return false
		}
	})
	v.Close() // Still fine after the context ended.
	goleak.VerifyNone(t)
}

func TestStatic(t *testing.T) {
	v := Static("static-secret")
	if got := v.Get(); got != "static-secret" {
		t.Errorf("Get() = %q", got)
	}
	if got := v.Version(); got != 1 {
		t.Errorf("Version() = %d, want 1", got)
	}
	v.Close()
	v.Close()
	if got := v.Get(); got != "static-secret" {
		t.Errorf("Get() after Close = %q", got)
	}
}

func TestNilAndZeroValue(t *testing.T) {
	var nilValue *Value
	var zero Value
	for name, v := range map[string]*Value{"nil": nilValue, "zero": &zero} {
		t.Run(name, func(t *testing.T) {
			if got := v.Get(); got != "" {
				t.Errorf("Get() = %q, want empty", got)
			}
			if got := v.Version(); got != 0 {
				t.Errorf("Version() = %d, want 0", got)
			}
			v.Close()
		})
	}
}

func TestValueDoesNotPrintSecret(t *testing.T) {
	v := Static("printed-secret")
	for _, format := range []string{"%v", "%+v", "%s", "%#v", "%q"} {
		if got := fmt.Sprintf(format, v); strings.Contains(got, "printed-secret") {
			t.Errorf("Sprintf(%q) = %q leaks the secret", format, got)
		}
	}
	core, logs := observer.New(zapcore.DebugLevel)
	zap.New(core).Info("config", zap.Any("sk", v), zap.Stringer("sk2", v))
	assertNoSecretInLogs(t, logs, []string{"printed-secret"})
}

func TestPair(t *testing.T) {
	dir := t.TempDir()
	skPath := filepath.Join(dir, "sk")
	writeFile(t, skPath, "sk-old-111\n")

	changed := make(chan struct{}, 1)
	sk, err := Watch(t.Context(), skPath, zap.NewNop(), WithOnChange(func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	p := Pair{AK: Static("AKIDEXAMPLE"), SK: sk}
	t.Cleanup(p.Close)

	if ak, sk := p.Get(); ak != "AKIDEXAMPLE" || sk != "sk-old-111" {
		t.Errorf("Get() = %q, %q", ak, sk)
	}
	before := p.Version()

	writeFile(t, skPath, "sk-new-222\n")
	select {
	case <-changed:
	case <-time.After(waitTimeout):
		t.Fatal("timed out waiting for the SK to change")
	}
	if ak, sk := p.Get(); ak != "AKIDEXAMPLE" || sk != "sk-new-222" {
		t.Errorf("Get() after rotation = %q, %q", ak, sk)
	}
	if after := p.Version(); after != before+1 {
		t.Errorf("Version() = %d after one change, want %d", after, before+1)
	}
}

func TestConcurrentGetDuringRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sk")
	writeFile(t, path, "v-0")
	h := start(t, path, nil, withoutFSNotify(), WithPollInterval(time.Millisecond))

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if s := h.v.Get(); !strings.HasPrefix(s, "v-") {
					t.Errorf("Get() = %q mid-rotation", s)
					return
				}
			}
		})
	}
	for i := 1; i <= 5; i++ {
		tmp := path + ".tmp"
		writeFile(t, tmp, fmt.Sprintf("v-%d", i))
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("v-%d", i)
		waitFor(t, want, func() bool { return h.v.Get() == want })
	}
	cancel()
	wg.Wait()
	if got := h.v.Version(); got != 6 {
		t.Errorf("Version() = %d after 5 rotations, want 6", got)
	}
}

func BenchmarkGet(b *testing.B) {
	path := filepath.Join(b.TempDir(), "sk")
	if err := os.WriteFile(path, []byte("bench-secret\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	v, err := Watch(b.Context(), path, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(v.Close)

	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var n int
		for pb.Next() {
			n += len(v.Get())
		}
		_ = n
	})
}
