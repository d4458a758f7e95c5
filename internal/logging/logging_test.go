package logging

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		level, format string
		ok            bool
	}{
		{"info", "json", true},
		{"debug", "console", true},
		{"warn", "", true},
		{"loud", "json", false},
		{"info", "xml", false},
	} {
		l, err := New(tc.level, tc.format)
		if (err == nil) != tc.ok {
			t.Errorf("New(%q,%q) err = %v, want ok=%v", tc.level, tc.format, err, tc.ok)
		}
		if l != nil {
			_ = l.Sync()
		}
	}
}

// The console format is for people and files alike: a warning is one
// line, without a stack trace or colour codes (found by review: zap's
// development settings added both).
func TestConsoleWarningIsOneLine(t *testing.T) {
	cfg, err := newConfig("info", "console")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "log")
	cfg.OutputPaths = []string{path}
	l, err := cfg.Build()
	if err != nil {
		t.Fatal(err)
	}
	l.Warn("no DLF credentials configured")
	_ = l.Sync()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := string(b)
	if !strings.Contains(out, "WARN") || strings.Count(out, "\n") != 1 || strings.Contains(out, "\x1b[") {
		t.Errorf("console warning = %q; want one line, WARN, no colour codes", out)
	}
}
