package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/testutil"
)

// child is a running worker process.
type child struct {
	cmd    *exec.Cmd
	stdout *testutil.SyncBuffer
	stderr *testutil.SyncBuffer
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
	c := &child{stdout: &testutil.SyncBuffer{}, stderr: &testutil.SyncBuffer{}, done: make(chan struct{})}
	c.cmd = exec.Command(program, args...)
	c.cmd.Env = []string{} // non-nil: no inherited environment
	for k, v := range env {
		c.cmd.Env = append(c.cmd.Env, k+"="+v)
	}
	if testutil.RaceEnabled {
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
	var s string
	testutil.Eventually(t, timeout, func() error {
		t.Helper()
		// Exit is read before output: Wait returns only once the output
		// is copied, so a miss after exit is final.
		exited := c.exited()
		if s = c.stdout.String(); strings.Contains(s, substr) {
			return nil
		}
		if exited {
			t.Fatalf("worker exited (%v) before printing %q", c.cmd.ProcessState, substr)
		}
		return fmt.Errorf("worker did not print %q", substr)
	})
	return s
}

// httpClient opens a new connection per request, so no idle connection
// outlives a test.
var httpClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}

// waitHTTP polls url until it answers want and returns the body; it fails
// when the process exits first or timeout passes.
func waitHTTP(t *testing.T, c *child, url string, want int, timeout time.Duration) string {
	t.Helper()
	var body string
	testutil.Eventually(t, timeout, func() error {
		t.Helper()
		resp, err := httpClient.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == want {
				body = string(b)
				return nil
			}
			err = fmt.Errorf("%s: %s", resp.Status, b)
		}
		if c.exited() {
			t.Fatalf("worker exited (%v) while waiting for GET %s -> %d (last: %v)", c.cmd.ProcessState, url, want, err)
		}
		return fmt.Errorf("GET %s: %v; want %d", url, err, want)
	})
	return body
}

// servingAddr waits for the worker's "serving operations HTTP" log line
// and returns the address it names (testutil.ServingAddr).
func servingAddr(t *testing.T, c *child, within time.Duration) string {
	t.Helper()
	var addr string
	testutil.Eventually(t, within, func() error {
		if addr = testutil.ServingAddr(strings.Split(c.stderr.String(), "\n")); addr != "" {
			return nil
		}
		if c.exited() {
			t.Fatalf("worker exited (%v) before serving; stderr: %s", c.cmd.ProcessState, c.stderr.String())
		}
		return fmt.Errorf("worker not serving yet")
	})
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
