package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A worker's log is captured whole, whatever the length of its lines: the
// secrets and panic searches read every line after a long one too (found
// by review: a line over 1 MiB ended the capture, and a token logged after
// it went unseen).
func TestLogCaptureKeepsLinesOfAnyLength(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "fakeworker")
	script := "#!/bin/sh\n" +
		"head -c 1400000 /dev/zero | tr '\\0' 'A'; echo\n" +
		"echo after-the-long-line\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	c := startWorkerBin(t, bin, nil)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the fake worker did not exit")
	}
	lines := c.lines()
	if len(lines) != 2 || len(lines[0]) != 1400000 || strings.Trim(lines[0], "A") != "" || lines[1] != "after-the-long-line" {
		var lens []int
		for _, l := range lines {
			lens = append(lens, len(l))
		}
		t.Fatalf("captured %d lines of lengths %v; want the long line and the one after it", len(lines), lens)
	}
}
