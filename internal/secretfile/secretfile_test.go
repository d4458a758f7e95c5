package secretfile

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
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

// withReadCount counts the successful re-reads in n.
func withReadCount(n *atomic.Int64) Option {
	return func(o *options) { o.afterRead = func() { n.Add(1) } }
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
		{"leading blanks trimmed, inner kept", "  s3 cr3t\n", "s3 cr3t"},
		{"blank first line", "\ns3cr3t\n", "s3cr3t"},
		{"byte order mark", "\ufeffs3cr3t\r\n", "s3cr3t"},
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

// The same for an AK/SK pair, which holds both (found by review: only
// Value's printing was checked).
func TestPairDoesNotPrintSecrets(t *testing.T) {
	p := StaticPair("printed-ak-1234", "printed-sk-5678")
	for _, format := range []string{"%v", "%+v", "%s", "%#v", "%q"} {
		got := fmt.Sprintf(format, p)
		if strings.Contains(got, "printed-ak") || strings.Contains(got, "printed-sk") {
			t.Errorf("Sprintf(%q) = %q leaks a key", format, got)
		}
	}
	core, logs := observer.New(zapcore.DebugLevel)
	zap.New(core).Info("config", zap.Any("pair", p), zap.Stringer("pair2", p))
	assertNoSecretInLogs(t, logs, []string{"printed-ak", "printed-sk"})
}

// An AK and an SK in one Kubernetes Secret are swapped together; the pair
// follows every swap, and no Get ever returns keys of two generations.
func TestPairFollowsKubernetesSwaps(t *testing.T) {
	dir := t.TempDir()
	keys := func(n int) map[string]string {
		return map[string]string{"ak": fmt.Sprintf("ak-%d", n), "sk": fmt.Sprintf("sk-%d", n)}
	}
	swap := kubeVolume(t, dir, keys(0))
	p, err := WatchPair(t.Context(), filepath.Join(dir, "ak"), filepath.Join(dir, "sk"), zap.NewNop(),
		WithPollInterval(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	if ak, sk := p.Get(); ak != "ak-0" || sk != "sk-0" {
		t.Fatalf("Get() = %q, %q", ak, sk)
	}

	// A reader checks every pair while the swaps go on; the 1ms poll
	// re-reads all the time, so reads land on swaps.
	stop := make(chan struct{})
	mixed := make(chan string, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if ak, sk := p.Get(); ak[len("ak-"):] != sk[len("sk-"):] {
				select {
				case mixed <- ak + " with " + sk:
				default:
				}
			}
		}
	}()
	const swaps = 50
	for n := 1; n <= swaps; n++ {
		swap(keys(n), true)
	}
	want := fmt.Sprintf("ak-%d", swaps)
	deadline := time.Now().Add(waitTimeout)
	for ak, _ := p.Get(); ak != want; ak, _ = p.Get() {
		if time.Now().After(deadline) {
			t.Fatalf("pair stuck at %s, want %s", ak, want)
		}
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()
	select {
	case m := <-mixed:
		t.Errorf("Get returned %s", m)
	default:
	}
	if fmt.Sprint(p) != "secretfile.Pair(redacted)" {
		t.Errorf("a Pair prints as %v", p)
	}
}

// A pair that cannot be read names the file at fault as it was given,
// not only the generation directory a Kubernetes volume resolves it to.
func TestPairErrorNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	gen := filepath.Join(dir, "..2024_a")
	if err := os.Mkdir(gen, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(gen, "ak"), "ak-1\n")
	writeFile(t, filepath.Join(gen, "sk"), "\n")
	for _, f := range []string{"ak", "sk"} {
		if err := os.Symlink(filepath.Join("..2024_a", f), filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	_, err := WatchPair(t.Context(), filepath.Join(dir, "ak"), filepath.Join(dir, "sk"), zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "sk")+":") || !errors.Is(err, ErrEmpty) {
		t.Errorf("err = %v, want one naming %s and empty", err, filepath.Join(dir, "sk"))
	}
}

func TestStaticPair(t *testing.T) {
	p := StaticPair("AKIDEXAMPLE", "sk-static")
	if ak, sk := p.Get(); ak != "AKIDEXAMPLE" || sk != "sk-static" || p.Version() != 1 {
		t.Errorf("Get() = %q, %q, version %d", ak, sk, p.Version())
	}
	p.Close() // nothing to stop
	var none *Pair
	if ak, sk := none.Get(); ak != "" || sk != "" || none.Version() != 0 {
		t.Error("a nil Pair is not empty")
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
