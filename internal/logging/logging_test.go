package logging

import "testing"

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
