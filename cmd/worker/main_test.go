package main

// These tests build the worker binary once and run it as a child process,
// as an operator or a container runtime would: a clean environment,
// signals, exit statuses, stdout and stderr.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/embedded"
)

// workerBin is the binary built by TestMain.
var workerBin string

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "dlf-stop-worker-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	workerBin = filepath.Join(dir, "worker")
	args := []string{"build", "-o", workerBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	// `go test` puts its own GOROOT/bin first on PATH.
	build := exec.Command("go", append(args, ".")...)
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go %s: %v\n%s", strings.Join(args, " "), err, out)
		return 1
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			return 1
		}
	}
	return code
}

// syncBuffer collects a child's output while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// child is a running worker process.
type child struct {
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{} // closed when the process has exited
}

// start runs the binary with exactly env as its environment (nothing is
// inherited, so NATS_* or DLF_* of the developer's shell cannot leak in).
// The process is killed when the test ends if it still runs.
func start(t *testing.T, env map[string]string, args ...string) *child {
	t.Helper()
	return startProgram(t, workerBin, env, args...)
}

// startProgram is start for any program (a shell running a printed line).
func startProgram(t *testing.T, program string, env map[string]string, args ...string) *child {
	t.Helper()
	c := &child{stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	c.cmd = exec.Command(program, args...)
	c.cmd.Env = []string{} // non-nil: no inherited environment
	for k, v := range env {
		c.cmd.Env = append(c.cmd.Env, k+"="+v)
	}
	if raceEnabled {
		// The race runtime otherwise sleeps a second before a 0 exit.
		c.cmd.Env = append(c.cmd.Env, "GORACE=atexit_sleep_ms=0")
	}
	c.cmd.Stdout, c.cmd.Stderr = c.stdout, c.stderr
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start %s %v: %v", program, args, err)
	}
	go func() {
		_ = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		if strings.Contains(c.stderr.String(), "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a race in worker %v", args)
		}
		if t.Failed() {
			t.Logf("worker %v stdout:\n%s\nstderr:\n%s", args, c.stdout.String(), c.stderr.String())
		}
	})
	return c
}

// exited reports whether the process has exited.
func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// wait returns the exit status, failing the test when the process runs
// longer than timeout.
func (c *child) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-c.done:
		return c.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("worker %v still running after %s", c.cmd.Args[1:], timeout)
		return -1
	}
}

// signal sends sig and returns the exit status, which must come within
// timeout.
func (c *child) signal(t *testing.T, sig os.Signal, timeout time.Duration) int {
	t.Helper()
	if err := c.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
	return c.wait(t, timeout)
}

// waitStdout polls until stdout contains substr; it fails when the process
// exits first or timeout passes.
func (c *child) waitStdout(t *testing.T, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if s := c.stdout.String(); strings.Contains(s, substr) {
			return s
		}
		select {
		case <-c.done:
			if s := c.stdout.String(); strings.Contains(s, substr) {
				return s
			}
			t.Fatalf("worker exited (%v) before printing %q", c.cmd.ProcessState, substr)
		case <-deadline:
			t.Fatalf("worker did not print %q within %s", substr, timeout)
		case <-tick.C:
		}
	}
}

// httpClient opens a new connection per request, so no idle connection
// outlives a test.
var httpClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}

// waitHTTP polls url until it answers want and returns the body; it fails
// when the process exits first or timeout passes.
func waitHTTP(t *testing.T, c *child, url string, want int, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		resp, err := httpClient.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == want {
				return string(body)
			}
			last = fmt.Sprintf("%s: %s", resp.Status, body)
		} else {
			last = err.Error()
		}
		if c.exited() {
			t.Fatalf("worker exited (%v) while waiting for GET %s -> %d (last: %s)", c.cmd.ProcessState, url, want, last)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %s; want %d within %s", url, last, want, timeout)
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-c.done:
		}
	}
}

// waitUntil polls cond until it holds, failing after timeout.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-t.Context().Done():
			t.FailNow()
		}
	}
}

// freeAddr returns a loopback address with a port free at the moment.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// hold listens on addr until the test ends, so a child cannot bind it; it
// reports false when something else holds addr already.
func hold(t *testing.T, addr string) bool {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Logf("%s is taken by another process: %v", addr, err)
		return false
	}
	t.Cleanup(func() { _ = l.Close() })
	return true
}

func startNATS(t *testing.T) *server.Server {
	t.Helper()
	ns, err := embedded.Start(embedded.Options{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatalf("start NATS: %v", err)
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns
}

func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// outcome is the part of an outcome event these tests look at.
type outcome struct {
	CommandID  string `json:"command_id"`
	ProjectID  string `json:"project_id"`
	ScriptName string `json:"script_name"`
	InstanceID string `json:"instance_id"`
	Status     string `json:"status"`
	Cause      string `json:"cause"`
	HTTPStatus int    `json:"http_status"`
	ErrorCode  string `json:"error_code"`
	WorkerID   string `json:"worker_id"`
}

// outcomes collects outcome events published after it subscribed.
type outcomes struct {
	ch   chan *nats.Msg
	seen []outcome
}

func watchOutcomes(t *testing.T, nc *nats.Conn) *outcomes {
	t.Helper()
	o := &outcomes{ch: make(chan *nats.Msg, 64)}
	sub, err := nc.ChanSubscribe("dlf.stop.outcome.*", o.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return o
}

// wait returns the first outcome match accepts, failing after timeout.
func (o *outcomes) wait(t *testing.T, timeout time.Duration, match func(outcome) bool) outcome {
	t.Helper()
	deadline := time.After(timeout)
	for {
		for _, e := range o.seen {
			if match(e) {
				return e
			}
		}
		select {
		case m := <-o.ch:
			var e outcome
			if err := json.Unmarshal(m.Data, &e); err != nil {
				t.Fatalf("outcome on %s is not JSON: %v: %s", m.Subject, err, m.Data)
			}
			o.seen = append(o.seen, e)
		case <-deadline:
			t.Fatalf("no matching outcome within %s (seen %+v)", timeout, o.seen)
		}
	}
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args       []string
		code       int
		stdout     string // substring expected on stdout
		stderr     string // substring expected on stderr
		quietOut   bool   // stdout must stay empty
		quietError bool   // stderr must stay empty
	}{
		{args: []string{"bogus"}, code: 64, stderr: `unknown command "bogus"`, quietOut: true},
		{args: []string{"help"}, code: 0, stdout: "worker stop --script S --instance I", quietError: true},
		{args: []string{"--help"}, code: 0, stdout: "worker dev", quietError: true},
		{args: []string{"-h"}, code: 0, stdout: "usage:", quietError: true},
		{args: []string{"stop"}, code: 64, stderr: "--script and --instance are required", quietOut: true},
		{args: []string{"stop", "--script", "s", "--instance", "i", "--wait", "0"}, code: 64, quietOut: true},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			c := start(t, nil, tt.args...)
			if code := c.wait(t, 10*time.Second); code != tt.code {
				t.Errorf("exit = %d, want %d", code, tt.code)
			}
			stdout, stderr := c.stdout.String(), c.stderr.String()
			if !strings.Contains(stdout, tt.stdout) || !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stdout = %q, stderr = %q; want %q in stdout and %q in stderr", stdout, stderr, tt.stdout, tt.stderr)
			}
			if tt.quietOut && stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if tt.quietError && stderr != "" {
				t.Errorf("stderr = %q, want nothing", stderr)
			}
		})
	}
}

func TestInvalidEnvironment(t *testing.T) {
	const secret = "supersecret-value"
	c := start(t, map[string]string{
		"DLF_TIMEOUT":        "abc",
		"WORKER_CONCURRENCY": "0",
		"HUAWEICLOUD_SDK_SK": secret,
		"DLF_ENDPOINT":       "http://example.com",
	})
	if code := c.wait(t, 10*time.Second); code == 0 {
		t.Error("exit = 0, want non-zero")
	}
	stderr := c.stderr.String()
	for _, name := range []string{"DLF_TIMEOUT", "WORKER_CONCURRENCY", "HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK", "DLF_ENDPOINT"} {
		if !strings.Contains(stderr, name) {
			t.Errorf("stderr does not name %s:\n%s", name, stderr)
		}
	}
	if strings.Contains(stderr, secret) || strings.Contains(c.stdout.String(), secret) {
		t.Errorf("output contains the secret key:\nstdout: %s\nstderr: %s", c.stdout.String(), stderr)
	}
}

func TestWorker(t *testing.T) {
	const (
		project = "proj-bin"
		script  = "nightly_load"
	)
	ns := startNATS(t)
	emu, emuURL := emulator.StartForTest(t)
	inst := emu.Execute(project, "", script)
	httpAddr := freeAddr(t)
	const shutdownTimeout = 3 * time.Second
	c := start(t, map[string]string{
		"NATS_URL":                   ns.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": project,
		"HTTP_ADDR":                  httpAddr,
		"SHUTDOWN_TIMEOUT":           shutdownTimeout.String(),
		"DLF_TIMEOUT":                "2s",
	})

	base := "http://" + httpAddr
	waitHTTP(t, c, base+"/healthz", http.StatusOK, 15*time.Second)
	waitHTTP(t, c, base+"/readyz", http.StatusOK, 15*time.Second)

	nc := connect(t, ns.ClientURL())
	got := watchOutcomes(t, nc)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"command_id":"bin-1","script_name":%q,"instance_id":%q,"reason":"test"}`, script, inst)
	if _, err := js.Publish(t.Context(), "dlf.stop.request", []byte(body)); err != nil {
		t.Fatalf("publish command: %v", err)
	}
	o := got.wait(t, 15*time.Second, func(o outcome) bool { return o.CommandID == "bin-1" })
	if o.Status != "stopped" || o.Cause != "ok" || o.ProjectID != project || o.InstanceID != inst || o.HTTPStatus != 204 || o.WorkerID == "" {
		t.Errorf("outcome = %+v, want stopped/ok/204 for %s/%s with a worker id", o, project, inst)
	}
	if !emu.Stopped(project, script, inst) {
		t.Error("emulator: instance not stopped")
	}
	if m := waitHTTP(t, c, base+"/metrics", http.StatusOK, 5*time.Second); !strings.Contains(m, "dlf_stop_") {
		t.Error("/metrics has no dlf_stop_ metric")
	}

	// SIGTERM while a DLF call is in flight: the call finishes, its
	// outcome is stored, and the process exits 0 within SHUTDOWN_TIMEOUT.
	slow := emu.Execute(project, "", script)
	emu.SetFaultsFor(project, script, slow, emulator.Faults{Latency: time.Second})
	body = fmt.Sprintf(`{"command_id":"bin-2","script_name":%q,"instance_id":%q}`, script, slow)
	if _, err := js.Publish(t.Context(), "dlf.stop.request", []byte(body)); err != nil {
		t.Fatalf("publish command: %v", err)
	}
	waitUntil(t, 10*time.Second, "the slow DLF call to arrive", func() bool {
		return emu.StopCallsFor(project, script, slow) > 0
	})
	start := time.Now()
	if code := c.signal(t, syscall.SIGTERM, shutdownTimeout+5*time.Second); code != 0 {
		t.Errorf("exit after SIGTERM = %d, want 0\nstderr:\n%s", code, c.stderr.String())
	}
	t.Logf("exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	o = got.wait(t, 5*time.Second, func(o outcome) bool { return o.CommandID == "bin-2" })
	if o.Status != "stopped" || !emu.Stopped(project, script, slow) {
		t.Errorf("in-flight command: outcome %+v, emulator stopped=%v; want stopped", o, emu.Stopped(project, script, slow))
	}
}

func TestWrongNATSPassword(t *testing.T) {
	const (
		right = "right-secret-pw"
		wrong = "wrong-secret-pw"
	)
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, Username: "worker", Password: right, NoLog: true, NoSigs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		t.Fatal("NATS not ready")
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	hostPort := ns.Addr().String()

	tests := []struct {
		name string
		env  map[string]string
	}{
		{"NATS_PASSWORD", map[string]string{"NATS_URL": "nats://" + hostPort, "NATS_USER": "worker", "NATS_PASSWORD": wrong}},
		{"password in NATS_URL", map[string]string{"NATS_URL": "nats://worker:" + wrong + "@" + hostPort}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.env["DLF_ENDPOINT"] = "http://127.0.0.1:9"
			tt.env["HTTP_ADDR"] = "127.0.0.1:0"
			c := start(t, tt.env)
			if code := c.wait(t, 15*time.Second); code == 0 {
				t.Error("exit = 0, want non-zero")
			}
			stderr := c.stderr.String()
			if !strings.Contains(strings.ToLower(stderr), "authorization") {
				t.Errorf("stderr does not mention authorization:\n%s", stderr)
			}
			if strings.Contains(stderr, wrong) || strings.Contains(c.stdout.String(), wrong) {
				t.Errorf("output contains the password:\nstdout: %s\nstderr: %s", c.stdout.String(), stderr)
			}
		})
	}
}

// banner is what `worker dev` prints on stdout.
type banner struct {
	natsURL   string
	httpAddr  string // host:port
	instances []string
	pubJSON   string   // payload of the `nats pub` line
	stopLine  string   // the `worker stop` line, trimmed
	stopEnv   string   // NATS_URL=... of that line
	stopArgs  []string // arguments after `stop` on that line
}

func parseBanner(t *testing.T, text string) banner {
	t.Helper()
	var b banner
	inInstances := false
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		f := strings.Fields(line)
		switch {
		case inInstances && len(f) == 1:
			b.instances = append(b.instances, f[0])
			continue
		case inInstances:
			inInstances = false
		}
		switch {
		case strings.HasPrefix(line, "NATS URL:") && len(f) >= 3:
			b.natsURL = f[2]
		case strings.HasPrefix(line, "HTTP address:") && len(f) >= 3:
			b.httpAddr = strings.TrimPrefix(f[2], "http://")
		case strings.HasPrefix(line, "Running instances ready to stop:"):
			inInstances = true
		case strings.Contains(line, " pub dlf.stop.request '"):
			i, j := strings.Index(line, "'"), strings.LastIndex(line, "'")
			if j > i {
				b.pubJSON = line[i+1 : j]
			}
		case strings.Contains(line, " stop --script "):
			b.stopLine = strings.TrimSpace(line)
			if len(f) > 0 && strings.HasPrefix(f[0], "NATS_URL=") {
				b.stopEnv = strings.TrimPrefix(f[0], "NATS_URL=")
			}
			_, after, _ := strings.Cut(line, " stop ")
			b.stopArgs = strings.Fields(after)
		}
	}
	if b.natsURL == "" || b.httpAddr == "" || len(b.instances) == 0 || b.pubJSON == "" || b.stopArgs == nil {
		t.Fatalf("banner incomplete (%+v):\n%s", b, text)
	}
	return b
}

func TestDev(t *testing.T) {
	// Take the preferred ports so the fallback to free ports is what runs
	// (when another process holds them already, that is the fallback too).
	held4222 := hold(t, "127.0.0.1:4222")
	held8080 := hold(t, "127.0.0.1:8080")
	tmp := t.TempDir()
	dev := start(t, map[string]string{"TMPDIR": tmp}, "dev")
	b := parseBanner(t, dev.waitStdout(t, " stop --script ", 30*time.Second))

	if held4222 && strings.HasSuffix(b.natsURL, ":4222") {
		t.Errorf("NATS URL %s uses port 4222, which the test holds", b.natsURL)
	}
	if held8080 && b.httpAddr == "127.0.0.1:8080" {
		t.Errorf("HTTP address %s is the one the test holds", b.httpAddr)
	}
	if b.stopEnv != b.natsURL {
		t.Errorf("worker stop line uses NATS_URL=%s, banner says %s", b.stopEnv, b.natsURL)
	}
	if len(b.instances) < 2 {
		t.Fatalf("instances = %v, want at least 2", b.instances)
	}
	waitHTTP(t, dev, "http://"+b.httpAddr+"/healthz", http.StatusOK, 10*time.Second)
	waitHTTP(t, dev, "http://"+b.httpAddr+"/readyz", http.StatusOK, 10*time.Second)

	// The printed worker stop line names this binary; pasted into a shell
	// as it is, it stops its instance.
	if f := strings.Fields(b.stopLine); len(f) < 3 || f[1] != workerBin || f[2] != "stop" {
		t.Errorf("worker stop line %q: want NATS_URL=... %s stop ...", b.stopLine, workerBin)
	}
	var stop *child
	if _, err := os.Stat("/bin/sh"); err == nil {
		stop = startProgram(t, "/bin/sh", nil, "-c", b.stopLine)
	} else {
		stop = start(t, map[string]string{"NATS_URL": b.stopEnv}, append([]string{"stop"}, b.stopArgs...)...)
	}
	if code := stop.wait(t, 35*time.Second); code != 0 {
		t.Errorf("%s: exit %d, want 0\nstderr: %s", b.stopLine, code, stop.stderr.String())
	}
	out := stop.stdout.String()
	if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") || !strings.Contains(out, `"status":"stopped"`) {
		t.Errorf("worker stop stdout = %q, want one JSON line with \"status\":\"stopped\"", out)
	}
	var so outcome
	if err := json.Unmarshal([]byte(out), &so); err != nil || !slices.Contains(b.instances, so.InstanceID) {
		t.Errorf("worker stop outcome %q (%v): want one for a listed instance", out, err)
	}

	// The printed nats pub line's payload, published as the nats CLI does.
	nc := connect(t, b.natsURL)
	got := watchOutcomes(t, nc)
	var pub outcome
	if err := json.Unmarshal([]byte(b.pubJSON), &pub); err != nil {
		t.Fatalf("nats pub payload %q: %v", b.pubJSON, err)
	}
	if !slices.Contains(b.instances, pub.InstanceID) || pub.InstanceID == so.InstanceID {
		t.Errorf("nats pub line stops %q; want a listed instance the worker stop line does not stop", pub.InstanceID)
	}
	if err := nc.Publish("dlf.stop.request", []byte(b.pubJSON)); err != nil {
		t.Fatal(err)
	}
	o := got.wait(t, 15*time.Second, func(o outcome) bool { return o.InstanceID == pub.InstanceID })
	if o.Status != "stopped" || o.HTTPStatus != 204 {
		t.Errorf("nats pub line: outcome %+v, want stopped with 204", o)
	}
	nc.Close()

	start := time.Now()
	if code := dev.signal(t, os.Interrupt, 15*time.Second); code != 0 {
		t.Errorf("worker dev exit after SIGINT = %d, want 0\nstderr:\n%s", code, dev.stderr.String())
	}
	t.Logf("worker dev exited %s after SIGINT", time.Since(start).Round(time.Millisecond))
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("worker dev left %d entries in TMPDIR (%s...)", len(left), left[0].Name())
	}
}

func TestSignalDuringStartup(t *testing.T) {
	// A NATS that accepts connections and never answers: the worker is
	// stuck connecting when the signal comes.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 8)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- conn
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		for conn := range accepted {
			_ = conn.Close()
		}
	})

	c := start(t, map[string]string{
		"NATS_URL":     "nats://" + l.Addr().String(),
		"DLF_ENDPOINT": "http://127.0.0.1:9",
		"HTTP_ADDR":    "127.0.0.1:0",
	})
	select {
	case conn := <-accepted:
		t.Cleanup(func() { _ = conn.Close() })
	case <-c.done:
		t.Fatalf("worker exited (%v) before connecting", c.cmd.ProcessState)
	case <-time.After(10 * time.Second):
		t.Fatal("worker did not connect within 10s")
	}
	if code := c.signal(t, syscall.SIGTERM, 5*time.Second); code != 0 {
		t.Errorf("exit after SIGTERM during start-up = %d, want 0", code)
	}
}
