package command

import (
	"bytes"
	"encoding/json"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// Independent re-statements of the contract rules, used as an oracle.
var (
	refID       = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	refToken64  = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)
	refToken128 = regexp.MustCompile(`^[A-Za-z0-9-]{1,128}$`)
	refScript   = regexp.MustCompile(`^[\p{L}0-9_.-]{1,128}$`)
	refRFC3339  = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$`)
)

func refScriptOK(s string) bool { return refScript.MatchString(s) && s != "." && s != ".." }

func refDeadline(s string) (time.Time, bool) {
	if !refRFC3339.MatchString(s) {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, strings.ToUpper(s))
	return t, err == nil
}

// reference decodes body the slow, obvious way: encoding/json's Decoder for
// syntax, a token walk to see duplicate keys, regexps for the rules. It
// returns the expected command and the field expected in the error ("" for
// none). The stream is assumed to follow the command_id charset.
func reference(body []byte, m Meta, d Defaults) (Command, string) {
	c := Command{ID: m.Stream + "-" + strconv.FormatUint(m.Seq, 10)}
	if refID.MatchString(m.MsgID) {
		c.ID = m.MsgID
	}
	if len(body) > 65536 || !utf8.Valid(body) {
		return c, "body"
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var whole any
	if err := dec.Decode(&whole); err != nil {
		return c, "body"
	}
	if len(bytes.TrimLeft(body[dec.InputOffset():], " \t\r\n")) != 0 {
		return c, "body"
	}
	if _, ok := whole.(map[string]any); !ok {
		return c, "body"
	}
	members := map[string][]any{}
	dec = json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil {
		panic(err)
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			panic(err)
		}
		var v any
		if err := dec.Decode(&v); err != nil {
			panic(err)
		}
		members[k.(string)] = append(members[k.(string)], v)
	}

	field := ""
	fail := func(f string) {
		if field == "" {
			field = f
		}
	}
	// get: (value, present, broken type or duplicate).
	get := func(name string) (string, bool, bool) {
		vs := members[name]
		switch {
		case len(vs) == 0:
			return "", false, false
		case len(vs) > 1:
			return "", false, true
		}
		switch v := vs[0].(type) {
		case nil:
			return "", false, false
		case string:
			return v, v != "", false
		}
		return "", false, true
	}

	if s, ok, bad := get("command_id"); bad || ok && !refID.MatchString(s) {
		fail("command_id")
	} else if ok && !m.Redrive {
		c.ID = s
	}
	if s, ok, bad := get("project_id"); bad || ok && !refToken64.MatchString(s) {
		fail("project_id")
	} else if ok {
		c.ProjectID = s
	} else if refToken64.MatchString(d.ProjectID) {
		c.ProjectID = d.ProjectID
	} else {
		fail("project_id")
	}
	if s, ok, bad := get("workspace"); bad || ok && !refToken64.MatchString(s) {
		fail("workspace")
	} else if ok {
		c.Workspace = s
	} else if d.Workspace == "" || refToken64.MatchString(d.Workspace) {
		c.Workspace = d.Workspace
	} else {
		fail("workspace")
	}
	if s, ok, bad := get("script_name"); bad || !ok || !refScriptOK(s) {
		fail("script_name")
	} else {
		c.ScriptName = s
	}
	if s, ok, bad := get("instance_id"); bad || !ok || !refToken128.MatchString(s) {
		fail("instance_id")
	} else {
		c.InstanceID = s
	}
	if s, ok, bad := get("deadline"); bad {
		fail("deadline")
	} else if ok {
		if t, good := refDeadline(s); good {
			c.Deadline = t
		} else {
			fail("deadline")
		}
	}
	if s, ok, bad := get("reason"); bad || ok && len(s) > 1024 {
		fail("reason")
	} else {
		c.Reason = s
	}
	return c, field
}

func FuzzDecode(f *testing.F) {
	seeds := []string{
		`{"command_id":"cmd-1","project_id":"proj-1","workspace":"ws-1","script_name":"nightly_load","instance_id":"inst-1","deadline":"2030-01-02T03:04:05Z","reason":"maintenance"}`,
		`{"script_name":"job","instance_id":"i-1"}`,
		`{"project_id":"p","script_name":"数据_加载.v2","instance_id":"i"}`,
		`{"project_id":"p","script_name":"caf\u00e9","instance_id":"i","reason":"\ud83d\ude80 go"}`,
		`{"project_id":"p","script_name":"..","instance_id":"i"}`,
		`{"project_id":"p","script_name":".","instance_id":"i"}`,
		`{"project_id":"p","script_name":"a/b","instance_id":"i"}`,
		`{"project_id":"p","script_name":"a%2Fb","instance_id":"i"}`,
		`{"project_id":"p","script_name":"job١","instance_id":"i"}`,
		`{"project_id":"p","script_name":"a\u0000b","instance_id":"i"}`,
		`{"project_id":"p","script_name":7,"instance_id":"i"}`,
		`{"project_id":"p","script_name":null,"instance_id":"i"}`,
		`{"project_id":"p","script_name":"","instance_id":"i"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","script_name":"job"}`,
		`{"project_id":"p","script\u005fname":"job","instance_id":"i"}`,
		`{"project_id":"p","Script_Name":"job","instance_id":"i"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","deadline":"2030-01-02T03:04:05,5+24:00"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","deadline":"2030-01-02T03:04:05.999999999-23:59"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","deadline":"2030-01-02t03:04:05.5z"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","deadline":"2030-12-31t23:59:60z"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","reason":"` + rep("r", 1025) + `"}`,
		`{"command_id":"a b","project_id":"p","script_name":"job","instance_id":"i"}`,
		`{"command_id":"` + rep("c", 128) + `","project_id":"p","script_name":"job","instance_id":"i"}`,
		`{"project_id":"p","script_name":"job","instance_id":"i","x":[[[{"y":"}]"}]]],"n":-1.5e3}`,
		`{"project_id":"p","script_name":"job","instance_id":"i"} trailing`,
		`{"project_id":"p","script_name":"job","instance_id":"i"`,
		`[{"script_name":"job"}]`,
		`null`,
		``,
		"{\"project_id\":\"p\",\"script_name\":\"jo\xffb\",\"instance_id\":\"i\"}",
		"\xef\xbb\xbf{}",
		`{"project_id":"p","workspace":"w s","script_name":"job","instance_id":"i.1"}`,
		`{"x":` + rep("[", 100) + rep("]", 100) + `,"script_name":"job","instance_id":"i"}`,
	}
	for i, s := range seeds {
		f.Add([]byte(s), "msg-1", i%3 == 0, i%2 == 0)
	}
	f.Add([]byte(seeds[0]), "bad id", true, false)
	f.Add([]byte(seeds[1]), "", false, true)

	f.Fuzz(func(t *testing.T, body []byte, msgID string, redrive, withDefaults bool) {
		m := Meta{MsgID: msgID, Stream: "DLF_STOP", Seq: 42}
		if redrive {
			m.Redrive = true
		}
		var d Defaults
		if withDefaults {
			d = Defaults{ProjectID: "def-proj", Workspace: "def-ws"}
		}
		orig := bytes.Clone(body)

		c, err := Decode(body, m, d)

		if !bytes.Equal(body, orig) {
			t.Fatal("Decode modified the body")
		}
		if !refID.MatchString(c.ID) {
			t.Fatalf("ID %q breaks the command_id rule", c.ID)
		}
		wantC, wantField := reference(body, m, d)
		if err != nil {
			var ve *ValidationError
			if !errors.As(err, &ve) || ve.Field == "" || ve.Rule == "" {
				t.Fatalf("error %v (%T) is not a complete *ValidationError", err, err)
			}
			if ve.Field != wantField {
				t.Fatalf("error %q, reference blames %q", ve.Error(), wantField)
			}
		} else {
			if wantField != "" {
				t.Fatalf("accepted; reference blames %q", wantField)
			}
			// Every field satisfies its rule.
			if !refToken64.MatchString(c.ProjectID) || c.Workspace != "" && !refToken64.MatchString(c.Workspace) ||
				!refScriptOK(c.ScriptName) || !refToken128.MatchString(c.InstanceID) || len(c.Reason) > 1024 {
				t.Fatalf("accepted command breaks a rule: %+v", c)
			}
			if k := c.InstanceKey(); !kvKey.MatchString(k) {
				t.Fatalf("InstanceKey %q is not KV-safe", k)
			}
		}
		if c.ID != wantC.ID || c.ProjectID != wantC.ProjectID || c.Workspace != wantC.Workspace ||
			c.ScriptName != wantC.ScriptName || c.InstanceID != wantC.InstanceID || c.Reason != wantC.Reason ||
			!c.Deadline.Equal(wantC.Deadline) {
			t.Fatalf("Decode = %+v\nreference %+v", c, wantC)
		}
	})
}

// Make sure the reference itself agrees with the hand-written tables.
func TestReferenceAgreesOnCorpus(t *testing.T) {
	for _, c := range corpusCases() {
		if _, field := reference(c.body, testMeta, Defaults{ProjectID: "d"}); field != c.field {
			t.Errorf("%s: reference blames %q, want %q", c.name, field, c.field)
		}
	}
}
