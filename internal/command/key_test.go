package command

import (
	"regexp"
	"testing"
)

// kvKey is what NATS accepts as a key-value key, plus "no empty token".
var kvKey = regexp.MustCompile(`^[-/_=.A-Za-z0-9]+$`)

func checkKVKey(t *testing.T, k string) {
	t.Helper()
	if !kvKey.MatchString(k) || k[0] == '.' || k[len(k)-1] == '.' || regexp.MustCompile(`\.\.`).MatchString(k) {
		t.Errorf("InstanceKey %q is not a valid KV key", k)
	}
}

func TestInstanceKeyKnownAnswers(t *testing.T) {
	tests := []struct {
		c    Command
		want string
	}{
		{Command{ProjectID: "p1", ScriptName: "nightly_load", InstanceID: "i-9"}, "p1._.=bmlnaHRseV9sb2Fk.i-9"},
		{Command{ProjectID: "p1", Workspace: "ws-1", ScriptName: "job", InstanceID: "i-9"}, "p1.ws-1.job.i-9"},
		{Command{ProjectID: "p1", Workspace: "ws-1", ScriptName: "数据", InstanceID: "i"}, "p1.ws-1.=5pWw5o2u.i"},
		{Command{ProjectID: "p1", ScriptName: "..", InstanceID: "i"}, "p1._.=Li4.i"},
		{Command{}, "_._._._"},
		// Fields outside their charset (never from Decode) are encoded too.
		{Command{ProjectID: "a.b", Workspace: "_", ScriptName: "s", InstanceID: "x/y"}, "=YS5i.=Xw.s.=eC95"},
	}
	for _, tt := range tests {
		got := tt.c.InstanceKey()
		if got != tt.want {
			t.Errorf("%+v.InstanceKey() = %q, want %q", tt.c, got, tt.want)
		}
		checkKVKey(t, got)
	}
}

func TestInstanceKeyUnambiguous(t *testing.T) {
	// Values chosen to collide under naive joins, escapes or encodings.
	values := []string{"", "_", "a", "a-b", "a.b", "a_b", "=YQ", "=", "YQ", "-", "ab", "a.", ".a", "é", "e", "a/b", "..", "."}
	seen := map[string]Command{}
	for _, p := range values {
		for _, w := range values {
			for _, s := range values {
				for _, i := range []string{"", "i", "a", "_", "a.b"} {
					c := Command{ProjectID: p, Workspace: w, ScriptName: s, InstanceID: i}
					k := c.InstanceKey()
					if prev, dup := seen[k]; dup {
						t.Fatalf("%+v and %+v share key %q", prev, c, k)
					}
					seen[k] = c
					checkKVKey(t, k)
				}
			}
		}
	}
}

func TestInstanceKeyIgnoresOtherFields(t *testing.T) {
	a := Command{ID: "a", ProjectID: "p", ScriptName: "s", InstanceID: "i", Reason: "x"}
	b := Command{ID: "b", ProjectID: "p", ScriptName: "s", InstanceID: "i"}
	if a.InstanceKey() != b.InstanceKey() {
		t.Error("InstanceKey depends on ID or Reason")
	}
	// Defaults count: the same instance with the default spelled out.
	c1, err1 := Decode([]byte(`{"script_name":"s","instance_id":"i"}`), testMeta, Defaults{ProjectID: "p", Workspace: "w"})
	c2, err2 := Decode([]byte(`{"project_id":"p","workspace":"w","script_name":"s","instance_id":"i"}`), testMeta, Defaults{})
	if err1 != nil || err2 != nil || c1.InstanceKey() != c2.InstanceKey() {
		t.Errorf("keys differ: %q vs %q (%v, %v)", c1.InstanceKey(), c2.InstanceKey(), err1, err2)
	}
}
