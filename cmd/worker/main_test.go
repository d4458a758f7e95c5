package main

// These tests build the worker binary once and run it as a child process,
// as an operator or a container runtime would: a clean environment,
// signals, exit statuses, stdout and stderr.

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
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
	if testutil.RaceEnabled {
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
		// Found by review: these started the whole dev environment.
		{args: []string{"dev", "--help"}, code: 0, stdout: "usage:", quietError: true},
		{args: []string{"dev", "4222"}, code: 64, stderr: `unexpected argument "4222"`, quietOut: true},
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
	ns := testutil.StartNATS(t)
	emu, emuURL := emulator.StartForTest(t)
	inst := emu.Execute(project, "", script)
	const shutdownTimeout = 3 * time.Second
	c := start(t, map[string]string{
		"NATS_URL":                   ns.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": project,
		"HTTP_ADDR":                  "127.0.0.1:0",
		"SHUTDOWN_TIMEOUT":           shutdownTimeout.String(),
		"DLF_TIMEOUT":                "2s",
	})

	base := "http://" + servingAddr(t, c, 15*time.Second)
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
	o := got.Wait(t, 15*time.Second, func(o consumer.Outcome) bool { return o.CommandID == "bin-1" })
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
	testutil.Eventually(t, 10*time.Second, func() error {
		if emu.StopCallsFor(project, script, slow) == 0 {
			return errors.New("the slow DLF call has not arrived")
		}
		return nil
	})
	start := time.Now()
	if code := c.signal(t, syscall.SIGTERM, shutdownTimeout+5*time.Second); code != 0 {
		t.Errorf("exit after SIGTERM = %d, want 0\nstderr:\n%s", code, c.stderr.String())
	}
	t.Logf("exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	o = got.Wait(t, 5*time.Second, func(o consumer.Outcome) bool { return o.CommandID == "bin-2" })
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
