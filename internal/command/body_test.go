package command

import (
	"bytes"
	"strings"
	"testing"
)

func TestBody(t *testing.T) {
	valid := body()
	tests := []struct {
		name   string
		body   string
		field  string // "" for success
		script string // checked on success when set
	}{
		{"plain", valid, "", "job"},
		{"surrounding whitespace", " \r\n\t" + valid + "\n ", "", "job"},
		{"whitespace inside", `{ "project_id" : "p" , "script_name" :"job",` + "\n" + `"instance_id": "i" }`, "", "job"},
		{"unknown fields ignored", body("priority", `3`, "labels", `{"a":[1,2,{"b":null}]}`, "tags", `["x","y"]`, "ok", `true`, "no", `null`), "", "job"},
		{"unknown fields with tricky strings", body("x", `"}],{[\"\\"`, "y", `["}\"]", "\\\\"]`, "z", `{"\"script_name\"":"evil"}`), "", "job"},
		{"nested script_name ignored", body("meta", `{"script_name":"evil","instance_id":"x"}`), "", "job"},
		{"numbers of all forms", body("a", `-0.5e+10`, "b", `0`, "c", `1E400`, "d", `-1`), "", "job"},
		{"unknown field first", `{"zzz":{"script_name":"x"},"project_id":"p","script_name":"job","instance_id":"i"}`, "", "job"},
		{"keys are case-sensitive", `{"project_id":"p","Script_Name":"evil","script_name":"job","instance_id":"i","SCRIPT_NAME":"evil"}`, "", "job"},
		{"case-different key is not the field", `{"project_id":"p","Script_Name":"job","instance_id":"i"}`, "script_name", ""},
		{"escaped key is the field", `{"project_id":"p","script\u005fname":"job","instance_id":"i"}`, "", "job"},
		{"duplicate unknown keys", `{"project_id":"p","x":1,"script_name":"job","x":[2],"instance_id":"i","x":null}`, "", "job"},
		{"duplicate known key", `{"project_id":"p","script_name":"job","instance_id":"i","instance_id":"i"}`, "instance_id", ""},
		{"duplicate known key via escape", `{"project_id":"p","script_name":"job","instance_id":"i","instance\u005fid":"j"}`, "instance_id", ""},
		{"duplicate with null", `{"project_id":"p","script_name":"job","instance_id":"i","reason":null,"reason":"r"}`, "reason", ""},
		{"empty object", `{}`, "project_id", ""},
		{"empty", ``, "body", ""},
		{"whitespace only", "  \n", "body", ""},
		{"null", `null`, "body", ""},
		{"array", `[` + valid + `]`, "body", ""},
		{"string", `"x"`, "body", ""},
		{"number", `1`, "body", ""},
		{"true", `true`, "body", ""},
		{"truncated", valid[:len(valid)-1], "body", ""},
		{"trailing garbage", valid + "x", "body", ""},
		{"trailing object", valid + valid, "body", ""},
		{"trailing comma", valid[:len(valid)-1] + ",}", "body", ""},
		{"single quotes", `{'script_name':'job'}`, "body", ""},
		{"BOM", "\xef\xbb\xbf" + valid, "body", ""},
		{"raw NUL in value", body("script_name", "\"a\x00b\""), "body", ""},
		{"raw NUL after object", valid + "\x00", "body", ""},
		{"raw tab in value", body("reason", "\"a\tb\""), "body", ""},
		{"invalid UTF-8 in value", body("reason", "\"a\xffb\""), "body", ""},
		{"invalid UTF-8 in unknown field", body("x", "\"\xc3\""), "body", ""},
		{"overlong encoding", body("reason", "\"\xc0\x80\""), "body", ""},
		{"encoded surrogate", body("reason", "\"\xed\xb0\x80\""), "body", ""},
		{"above U+10FFFF", body("reason", "\"\xf4\x90\x80\x80\""), "body", ""},
		{"invalid UTF-8 outside strings", valid + "\xff", "body", ""},
		{"4-byte UTF-8 is fine", body("reason", `"🚀"`), "", "job"},
		{"lone surrogate escape is valid JSON", body("reason", `"\ud800"`), "", "job"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(tt.body), testMeta, Defaults{})
			checkField(t, err, tt.field)
			if tt.script != "" && c.ScriptName != tt.script {
				t.Errorf("ScriptName = %q, want %q", c.ScriptName, tt.script)
			}
		})
	}
}

func TestBodySizeLimit(t *testing.T) {
	for _, tt := range []struct {
		size  int
		field string
	}{
		{MaxBodySize - 1, ""},
		{MaxBodySize, ""},
		{MaxBodySize + 1, "body"},
		{4 * MaxBodySize, "body"},
	} {
		b := padTo([]byte(body("pad", `""`)), tt.size)
		if len(b) != tt.size {
			t.Fatalf("padTo made %d bytes, want %d", len(b), tt.size)
		}
		c, err := Decode(b, testMeta, Defaults{})
		checkField(t, err, tt.field)
		if tt.field == "" && c.ScriptName != "job" {
			t.Errorf("size %d: ScriptName = %q", tt.size, c.ScriptName)
		}
	}
	// Over the limit is rejected without parsing: even garbage says "size".
	_, err := Decode(bytes.Repeat([]byte{0xff}, MaxBodySize+1), testMeta, Defaults{})
	if ve := checkField(t, err, "body"); !strings.Contains(ve.Rule, "at most 65536 bytes") {
		t.Errorf("rule = %q, want the size rule", ve.Rule)
	}
}

func TestDeepNesting(t *testing.T) {
	tests := []struct {
		name  string
		body  string
		field string
	}{
		{"9999 arrays in unknown field (depth 10000)", body("x", rep("[", 9999)+rep("]", 9999)), ""},
		{"10000 arrays in unknown field", body("x", rep("[", 10000)+rep("]", 10000)), "body"},
		{"9000 objects in unknown field", body("x", rep(`{"a":`, 9000)+"1"+rep("}", 9000)), ""},
		{"10001 nested objects", rep(`{"a":`, 10000) + body() + rep("}", 10000), "body"},
		{"unclosed arrays to the size limit", `{"x":` + rep("[", MaxBodySize-5), "body"},
		{"10000 arrays at top level", rep("[", 10000) + rep("]", 10000), "body"},
		{"deep strings with brackets", body("x", rep(`["]",`, 5000)+`0`+rep("]", 5000)), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(tt.body), testMeta, Defaults{})
			checkField(t, err, tt.field)
			if tt.field == "" && c.ScriptName != "job" {
				t.Errorf("ScriptName = %q, want job", c.ScriptName)
			}
		})
	}
}

func TestCorpusIsRejected(t *testing.T) {
	cases := corpusCases()
	if got := len(Corpus()); got != len(cases) || got < 60 {
		t.Fatalf("Corpus() has %d bodies, want %d (at least 60)", got, len(cases))
	}
	metas := []Meta{
		testMeta,
		{Stream: "DLF_STOP", Seq: 1},
		{MsgID: "bad id", Stream: "DLF_STOP", Seq: 2},
		{MsgID: "new-1", Redrive: true, Stream: "DLF_STOP", Seq: 3},
	}
	defaults := []Defaults{{}, {ProjectID: "def-proj"}, {ProjectID: "def-proj", Workspace: "def-ws"}}
	seen := map[string]bool{}
	for _, c := range cases {
		if seen[string(c.body)] {
			t.Errorf("%s: body repeats an earlier case", c.name)
		}
		seen[string(c.body)] = true
		t.Run(c.name, func(t *testing.T) {
			for _, m := range metas {
				for _, d := range defaults {
					got, err := Decode(c.body, m, d)
					checkField(t, err, c.field)
					if !ValidID(got.ID) {
						t.Errorf("ID %q is not valid", got.ID)
					}
				}
			}
		})
	}
	// Fresh slices every call.
	a, b := Corpus(), Corpus()
	a[0] = append(a[0], 'x')
	a[1][0] = '!'
	if len(b[0]) != 0 || b[1][0] == '!' {
		t.Error("Corpus() shares memory between calls")
	}
}
