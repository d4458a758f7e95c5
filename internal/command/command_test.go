package command

import (
	"strings"
	"testing"
	"time"
)

var rep = strings.Repeat

func TestCommandID(t *testing.T) {
	redrive := Meta{MsgID: "new-1", Redrive: true, Stream: "DLF_STOP", Seq: 12}
	tests := []struct {
		name   string
		body   string
		meta   Meta
		wantID string
		field  string // "" for success
	}{
		{"absent: Nats-Msg-Id", body(), testMeta, "msg-1", ""},
		{"null: Nats-Msg-Id", body("command_id", `null`), testMeta, "msg-1", ""},
		{"empty: Nats-Msg-Id", body("command_id", `""`), testMeta, "msg-1", ""},
		{"absent, no header: stream-seq", body(), Meta{Stream: "DLF_STOP", Seq: 12}, "DLF_STOP-12", ""},
		{"absent, header with space: stream-seq", body(), Meta{MsgID: "a b", Stream: "DLF_STOP", Seq: 12}, "DLF_STOP-12", ""},
		{"absent, header with slash: stream-seq", body(), Meta{MsgID: "a/b", Stream: "DLF_STOP", Seq: 7}, "DLF_STOP-7", ""},
		{"absent, header 128: header", body(), Meta{MsgID: rep("h", 128), Stream: "S", Seq: 1}, rep("h", 128), ""},
		{"absent, header 129: stream-seq", body(), Meta{MsgID: rep("h", 129), Stream: "S", Seq: 1}, "S-1", ""},
		{"absent, seq 0", body(), Meta{Stream: "DLF_STOP"}, "DLF_STOP-0", ""},
		{"absent, max seq", body(), Meta{Stream: "DLF_STOP", Seq: 1<<64 - 1}, "DLF_STOP-18446744073709551615", ""},
		{"body id", body("command_id", `"cmd-1"`), testMeta, "cmd-1", ""},
		{"body id 1 char", body("command_id", `"x"`), testMeta, "x", ""},
		{"body id 128", body("command_id", q(rep("c", 128))), testMeta, rep("c", 128), ""},
		{"body id full charset", body("command_id", `"AZaz09._:-"`), testMeta, "AZaz09._:-", ""},
		{"body id escaped", body("command_id", `"cmd\u002d1"`), testMeta, "cmd-1", ""},
		{"body id 129 rejected, header id", body("command_id", q(rep("c", 129))), testMeta, "msg-1", "command_id"},
		{"body id space", body("command_id", `"a b"`), testMeta, "msg-1", "command_id"},
		{"body id slash", body("command_id", `"a/b"`), testMeta, "msg-1", "command_id"},
		{"body id percent", body("command_id", `"a%2Fb"`), testMeta, "msg-1", "command_id"},
		{"body id at", body("command_id", `"a@b"`), testMeta, "msg-1", "command_id"},
		{"body id plus", body("command_id", `"a+b"`), testMeta, "msg-1", "command_id"},
		{"body id unicode", body("command_id", `"cmd-ü"`), testMeta, "msg-1", "command_id"},
		{"body id NUL", body("command_id", `"a\u0000"`), testMeta, "msg-1", "command_id"},
		{"body id newline", body("command_id", `"a\n"`), testMeta, "msg-1", "command_id"},
		{"body id number", body("command_id", `42`), testMeta, "msg-1", "command_id"},
		{"body id bool", body("command_id", `false`), testMeta, "msg-1", "command_id"},
		{"body id object", body("command_id", `{}`), testMeta, "msg-1", "command_id"},
		{"body id array", body("command_id", `["x"]`), testMeta, "msg-1", "command_id"},
		{"bad body id, bad header: stream-seq", body("command_id", `"a b"`), Meta{MsgID: "x y", Stream: "DLF_STOP", Seq: 3}, "DLF_STOP-3", "command_id"},
		{"redrive: header wins over body", body("command_id", `"cmd-1"`), redrive, "new-1", ""},
		{"redrive without body id", body(), redrive, "new-1", ""},
		{"redrive, bad header: stream-seq", body("command_id", `"cmd-1"`), Meta{MsgID: "bad id", Redrive: true, Stream: "DLF_STOP", Seq: 9}, "DLF_STOP-9", ""},
		{"redrive, no header: stream-seq", body("command_id", `"cmd-1"`), Meta{Redrive: true, Stream: "DLF_STOP", Seq: 9}, "DLF_STOP-9", ""},
		{"redrive still validates body id", body("command_id", `"bad id"`), redrive, "new-1", "command_id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(tt.body), tt.meta, Defaults{})
			checkField(t, err, tt.field)
			if c.ID != tt.wantID {
				t.Errorf("ID = %q, want %q", c.ID, tt.wantID)
			}
			if !ValidID(c.ID) {
				t.Errorf("ID %q is not valid", c.ID)
			}
			// Every row's ids are distinct from "<stream>-<seq>" unless
			// they come from it.
			if want := tt.wantID == streamSeqID(tt.meta.Stream, tt.meta.Seq); c.SeqID != want {
				t.Errorf("SeqID = %v, want %v", c.SeqID, want)
			}
		})
	}
}

func TestStreamSeqIDFollowsRule(t *testing.T) {
	tests := []struct {
		stream string
		seq    uint64
		want   string
	}{
		{"DLF_STOP", 12, "DLF_STOP-12"},
		{"", 5, "-5"},
		{"Ströme", 1, "Str__me-1"},
		{"a b/c", 2, "a_b_c-2"},
		{rep("s", 200), 1<<64 - 1, rep("s", 128-21) + "-18446744073709551615"},
		{rep("s", 200), 1, rep("s", 126) + "-1"},
	}
	for _, tt := range tests {
		got := streamSeqID(tt.stream, tt.seq)
		if got != tt.want {
			t.Errorf("streamSeqID(%q, %d) = %q, want %q", tt.stream, tt.seq, got, tt.want)
		}
		if !ValidID(got) {
			t.Errorf("streamSeqID(%q, %d) = %q breaks the command_id rule", tt.stream, tt.seq, got)
		}
	}
}

func TestValidID(t *testing.T) {
	for _, s := range []string{"a", "Z", "0", ".", "_", ":", "-", rep("x", 128), "DLF_STOP-12", "urn:cmd:1.2_3"} {
		if !ValidID(s) {
			t.Errorf("ValidID(%q) = false, want true", s)
		}
	}
	for _, s := range []string{"", rep("x", 129), " ", "a b", "a/b", "a%b", "é", "a\x00", "a\n", "*", ">", "١"} {
		if ValidID(s) {
			t.Errorf("ValidID(%q) = true, want false", s)
		}
	}
}

func TestProjectAndWorkspace(t *testing.T) {
	defs := Defaults{ProjectID: "def-proj", Workspace: "def-ws"}
	tests := []struct {
		name      string
		body      string
		defs      Defaults
		field     string
		rule      string // checked when set
		project   string
		workspace string
	}{
		{"defaults applied when absent", body("project_id", "-"), defs, "", "", "def-proj", "def-ws"},
		{"defaults applied for empty strings", body("project_id", `""`, "workspace", `""`), defs, "", "", "def-proj", "def-ws"},
		{"defaults applied for null", body("project_id", `null`, "workspace", `null`), defs, "", "", "def-proj", "def-ws"},
		{"body wins over defaults", body("workspace", `"ws-9"`), defs, "", "", "proj-1", "ws-9"},
		{"no workspace anywhere", body(), Defaults{}, "", "", "proj-1", ""},
		{"project missing both", body("project_id", "-"), Defaults{Workspace: "w"}, "project_id", ruleNoProject, "", "w"},
		{"project empty, no default", body("project_id", `""`), Defaults{}, "project_id", ruleNoProject, "", ""},
		{"project 1", body("project_id", `"p"`), Defaults{}, "", "", "p", ""},
		{"project 64", body("project_id", q(rep("p", 64))), Defaults{}, "", "", rep("p", 64), ""},
		{"project 65", body("project_id", q(rep("p", 65))), defs, "project_id", ruleToken64, "", "def-ws"},
		{"project full charset", body("project_id", `"AZaz09-"`), Defaults{}, "", "", "AZaz09-", ""},
		{"project underscore", body("project_id", `"a_b"`), defs, "project_id", ruleToken64, "", "def-ws"},
		{"project dot", body("project_id", `"a.b"`), defs, "project_id", "", "", "def-ws"},
		{"project slash", body("project_id", `"a/b"`), defs, "project_id", "", "", "def-ws"},
		{"project %2F", body("project_id", `"a%2Fb"`), defs, "project_id", "", "", "def-ws"},
		{"project space", body("project_id", `"a b"`), defs, "project_id", "", "", "def-ws"},
		{"project unicode", body("project_id", `"prøj"`), defs, "project_id", "", "", "def-ws"},
		{"project NUL", body("project_id", `"p\u0000"`), defs, "project_id", "", "", "def-ws"},
		{"project number", body("project_id", `1234`), defs, "project_id", ruleString, "", "def-ws"},
		{"project object", body("project_id", `{"id":"p"}`), defs, "project_id", ruleString, "", "def-ws"},
		{"invalid project default", body("project_id", "-"), Defaults{ProjectID: "bad proj"}, "project_id", ruleDefProject, "", ""},
		{"invalid project default unused", body(), Defaults{ProjectID: "bad proj"}, "", "", "proj-1", ""},
		{"workspace 1", body("workspace", `"w"`), Defaults{}, "", "", "proj-1", "w"},
		{"workspace 64", body("workspace", q(rep("w", 64))), Defaults{}, "", "", "proj-1", rep("w", 64)},
		{"workspace 65", body("workspace", q(rep("w", 65))), defs, "workspace", ruleToken64, "proj-1", ""},
		{"workspace space", body("workspace", `"w s"`), defs, "workspace", "", "proj-1", ""},
		{"workspace CRLF", body("workspace", `"w\r\nx"`), defs, "workspace", "", "proj-1", ""},
		{"workspace dot", body("workspace", `"w.s"`), defs, "workspace", "", "proj-1", ""},
		{"workspace bool", body("workspace", `true`), defs, "workspace", ruleString, "proj-1", ""},
		{"workspace array", body("workspace", `["w"]`), defs, "workspace", ruleString, "proj-1", ""},
		{"invalid workspace default", body(), Defaults{Workspace: "w/s"}, "workspace", ruleDefWS, "proj-1", ""},
		{"invalid workspace default unused", body("workspace", `"ws"`), Defaults{Workspace: "w/s"}, "", "", "proj-1", "ws"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(tt.body), testMeta, tt.defs)
			ve := checkField(t, err, tt.field)
			if tt.rule != "" && ve.Rule != tt.rule {
				t.Errorf("rule = %q, want %q", ve.Rule, tt.rule)
			}
			if c.ProjectID != tt.project || c.Workspace != tt.workspace {
				t.Errorf("project, workspace = %q, %q; want %q, %q", c.ProjectID, c.Workspace, tt.project, tt.workspace)
			}
		})
	}
}

func TestScriptName(t *testing.T) {
	tests := []struct {
		name  string
		value string // raw JSON
		want  string // decoded script name on success
		rule  string // "" for success
	}{
		{"1 char", `"a"`, "a", ""},
		{"128 ASCII", q(rep("a", 128)), rep("a", 128), ""},
		{"129 ASCII", q(rep("a", 129)), "", ruleScript},
		{"128 two-byte letters", q(rep("é", 128)), rep("é", 128), ""},
		{"129 two-byte letters", q(rep("é", 129)), "", ruleScript},
		{"128 three-byte letters", q(rep("中", 128)), rep("中", 128), ""},
		{"129 three-byte letters", q(rep("中", 129)), "", ruleScript},
		{"128 four-byte letters", q(rep("𠀀", 128)), rep("𠀀", 128), ""},
		{"129 four-byte letters", q(rep("𠀀", 129)), "", ruleScript},
		{"10 KB", q(rep("a", 10<<10)), "", ruleScript},
		{"digits and punctuation", `"Job_1-2.v3"`, "Job_1-2.v3", ""},
		{"all digits", `"0123456789"`, "0123456789", ""},
		{"Greek Cyrillic CJK Arabic Hebrew letters", `"αβγ_жзи_数据_بيانات_נתונים"`, "αβγ_жзи_数据_بيانات_נתונים", ""},
		{"escaped letter", `"caf\u00e9"`, "café", ""},
		{"only dash", `"-"`, "-", ""},
		{"only underscore", `"_"`, "_", ""},
		{"three dots", `"..."`, "...", ""},
		{"leading dot", `".hidden"`, ".hidden", ""},
		{"trailing dots", `"a.."`, "a..", ""},
		{"dot", `"."`, "", ruleDots},
		{"dotdot", `".."`, "", ruleDots},
		{"escaped dotdot", `"\u002e\u002e"`, "", ruleDots},
		{"Arabic-Indic digits", `"job١٢٣"`, "", ruleScript},
		{"Extended Arabic-Indic digit", `"job۴"`, "", ruleScript},
		{"Devanagari digit", `"job५"`, "", ruleScript},
		{"fullwidth digit", `"job１"`, "", ruleScript},
		{"superscript two", `"job²"`, "", ruleScript},
		{"roman numeral (Nl)", `"jobⅫ"`, "", ruleScript},
		{"combining accent", `"e\u0301"`, "", ruleScript},
		{"zero-width joiner", `"a\u200db"`, "", ruleScript},
		{"emoji", `"job🚀"`, "", ruleScript},
		{"replacement char from lone surrogate", `"a\ud800"`, "", ruleScript},
		{"slash", `"a/b"`, "", ruleScript},
		{"backslash", `"a\\b"`, "", ruleScript},
		{"percent-encoded slash", `"a%2Fb"`, "", ruleScript},
		{"traversal", `"../etc"`, "", ruleScript},
		{"space", `"a b"`, "", ruleScript},
		{"leading space", `" a"`, "", ruleScript},
		{"no-break space", `"a\u00a0b"`, "", ruleScript},
		{"tab", `"a\tb"`, "", ruleScript},
		{"newline", `"a\nb"`, "", ruleScript},
		{"NUL", `"a\u0000b"`, "", ruleScript},
		{"DEL", `"a\u007fb"`, "", ruleScript},
		{"C1 control", `"a\u0085b"`, "", ruleScript},
		{"question mark", `"a?b"`, "", ruleScript},
		{"hash", `"a#b"`, "", ruleScript},
		{"colon", `"a:b"`, "", ruleScript},
		{"null", `null`, "", ruleRequired},
		{"empty", `""`, "", ruleRequired},
		{"absent", `-`, "", ruleRequired},
		{"number", `7`, "", ruleString},
		{"bool", `true`, "", ruleString},
		{"object", `{"name":"job"}`, "", ruleString},
		{"array", `["job"]`, "", ruleString},
		{"duplicate", "", "", ruleDuplicate}, // body built below
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := body("script_name", tt.value)
			if tt.name == "duplicate" {
				b = `{"project_id":"p","script_name":"a","instance_id":"i","script_name":"a"}`
			}
			c, err := Decode([]byte(b), testMeta, Defaults{})
			field := ""
			if tt.rule != "" {
				field = "script_name"
			}
			ve := checkField(t, err, field)
			if ve != nil && ve.Rule != tt.rule {
				t.Errorf("rule = %q, want %q", ve.Rule, tt.rule)
			}
			if c.ScriptName != tt.want {
				t.Errorf("ScriptName = %q, want %q", c.ScriptName, tt.want)
			}
		})
	}
}

func TestInstanceID(t *testing.T) {
	tests := []struct {
		name  string
		value string
		want  string
		rule  string
	}{
		{"1 char", `"i"`, "i", ""},
		{"128", q(rep("1", 128)), rep("1", 128), ""},
		{"129", q(rep("1", 129)), "", ruleToken128},
		{"full charset", `"AZaz09-"`, "AZaz09-", ""},
		{"uuid", `"3f2b8c1e-9d4a-4c6b-8e2f-1a2b3c4d5e6f"`, "3f2b8c1e-9d4a-4c6b-8e2f-1a2b3c4d5e6f", ""},
		{"dot", `"a.b"`, "", ruleToken128},
		{"underscore", `"a_b"`, "", ruleToken128},
		{"slash", `"a/b"`, "", ruleToken128},
		{"%2F", `"a%2Fb"`, "", ruleToken128},
		{"space", `"a b"`, "", ruleToken128},
		{"unicode letter", `"é"`, "", ruleToken128},
		{"Arabic-Indic digit", `"١"`, "", ruleToken128},
		{"NUL", `"\u0000"`, "", ruleToken128},
		{"10 KB", q(rep("1", 10<<10)), "", ruleToken128},
		{"null", `null`, "", ruleRequired},
		{"empty", `""`, "", ruleRequired},
		{"absent", `-`, "", ruleRequired},
		{"number", `12345`, "", ruleString},
		{"bool", `false`, "", ruleString},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(body("instance_id", tt.value)), testMeta, Defaults{})
			field := ""
			if tt.rule != "" {
				field = "instance_id"
			}
			if ve := checkField(t, err, field); ve != nil && ve.Rule != tt.rule {
				t.Errorf("rule = %q, want %q", ve.Rule, tt.rule)
			}
			if c.InstanceID != tt.want {
				t.Errorf("InstanceID = %q, want %q", c.InstanceID, tt.want)
			}
		})
	}
}

func TestDeadline(t *testing.T) {
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	tests := []struct {
		name  string
		value string
		want  time.Time
		ok    bool
	}{
		{"UTC", `"2030-01-02T03:04:05Z"`, at("2030-01-02T03:04:05Z"), true},
		{"fraction", `"2030-01-02T03:04:05.123456789Z"`, at("2030-01-02T03:04:05.123456789Z"), true},
		{"one fraction digit", `"2030-01-02T03:04:05.5Z"`, at("2030-01-02T03:04:05.5Z"), true},
		{"offset", `"2030-01-02T03:04:05+08:00"`, at("2030-01-01T19:04:05Z"), true},
		{"negative offset", `"2030-01-02T03:04:05-05:30"`, at("2030-01-02T08:34:05Z"), true},
		{"offset 23:59", `"2030-01-02T03:04:05+23:59"`, at("2030-01-01T03:05:05Z"), true},
		{"unknown local offset", `"2030-01-02T03:04:05-00:00"`, at("2030-01-02T03:04:05Z"), true},
		{"in the past is still valid", `"2001-01-01T00:00:00Z"`, at("2001-01-01T00:00:00Z"), true},
		{"null", `null`, time.Time{}, true},
		{"empty", `""`, time.Time{}, true},
		{"absent", `-`, time.Time{}, true},
		{"no zone", `"2030-01-02T03:04:05"`, time.Time{}, false},
		{"space separator", `"2030-01-02 03:04:05Z"`, time.Time{}, false},
		{"lower-case t and z", `"2030-01-02t03:04:05z"`, at("2030-01-02T03:04:05Z"), true},
		{"lower-case t", `"2030-01-02t03:04:05.5+08:00"`, at("2030-01-01T19:04:05.5Z"), true},
		{"lower-case z", `"2030-01-02T03:04:05z"`, at("2030-01-02T03:04:05Z"), true},
		{"other letter as separator", `"2030-01-02x03:04:05Z"`, time.Time{}, false},
		{"lower-case t with one-digit hour", `"2030-01-02t3:04:05z"`, time.Time{}, false},
		{"lower-case z with offset", `"2030-01-02T03:04:05z+01:00"`, time.Time{}, false},
		{"lower-case t, space separator", `"2030-01-02 t03:04:05z"`, time.Time{}, false},
		{"lower-case month 13", `"2030-13-02t03:04:05z"`, time.Time{}, false},
		{"one-digit hour", `"2030-01-02T3:04:05Z"`, time.Time{}, false},
		{"one-digit hour with offset", `"2030-01-02T3:04:05.9-23:59"`, time.Time{}, false},
		{"two-digit year", `"30-01-02T03:04:05Z"`, time.Time{}, false},
		{"trailing text", `"2030-01-02T03:04:05Zx"`, time.Time{}, false},
		{"offset with seconds", `"2030-01-02T03:04:05+01:00:00"`, time.Time{}, false},
		{"comma fraction", `"2030-01-02T03:04:05,5Z"`, time.Time{}, false},
		{"empty fraction", `"2030-01-02T03:04:05.Z"`, time.Time{}, false},
		{"offset hour 24", `"2030-01-02T03:04:05+24:00"`, time.Time{}, false},
		{"offset minute 60", `"2030-01-02T03:04:05+01:60"`, time.Time{}, false},
		{"offset without colon", `"2030-01-02T03:04:05+0100"`, time.Time{}, false},
		{"date only", `"2030-01-02"`, time.Time{}, false},
		{"month 13", `"2030-13-02T03:04:05Z"`, time.Time{}, false},
		{"February 30", `"2030-02-30T03:04:05Z"`, time.Time{}, false},
		{"hour 24", `"2030-01-02T24:00:00Z"`, time.Time{}, false},
		// RFC 3339 allows a leap second; time.Time cannot hold one.
		{"leap second", `"2030-12-31T23:59:60Z"`, time.Time{}, false},
		{"leap second, lower case", `"2030-12-31t23:59:60z"`, time.Time{}, false},
		{"leading space", `" 2030-01-02T03:04:05Z"`, time.Time{}, false},
		{"RFC 1123", `"Wed, 02 Jan 2030 03:04:05 GMT"`, time.Time{}, false},
		{"words", `"tomorrow"`, time.Time{}, false},
		{"unix seconds", `1900000000`, time.Time{}, false},
		{"unix seconds as string", `"1900000000"`, time.Time{}, false},
		{"object", `{"at":"2030-01-02T03:04:05Z"}`, time.Time{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(body("deadline", tt.value)), testMeta, Defaults{})
			field := "deadline"
			if tt.ok {
				field = ""
			}
			checkField(t, err, field)
			if !c.Deadline.Equal(tt.want) {
				t.Errorf("Deadline = %v, want %v", c.Deadline, tt.want)
			}
		})
	}
}

// RFC 3339 section 5.6: "T" and "Z" may be lower case, with the same meaning.
func TestDeadlineLowerCaseSameInstant(t *testing.T) {
	for _, upper := range []string{
		"2030-01-02T03:04:05Z",
		"2030-01-02T03:04:05.123456789Z",
		"2030-01-02T03:04:05+08:00",
		"2030-01-02T03:04:05.5-05:30",
		"2030-01-02T03:04:05-00:00",
	} {
		t.Run(upper, func(t *testing.T) {
			want, err := Decode([]byte(body("deadline", q(upper))), testMeta, Defaults{})
			if err != nil {
				t.Fatal(err)
			}
			for _, lower := range []string{
				strings.Replace(upper, "T", "t", 1),
				strings.Replace(upper, "Z", "z", 1),
				strings.ToLower(upper),
			} {
				got, err := Decode([]byte(body("deadline", q(lower))), testMeta, Defaults{})
				if err != nil {
					t.Fatalf("%s: %v", lower, err)
				}
				if !got.Deadline.Equal(want.Deadline) {
					t.Errorf("%s: Deadline = %v, want %v", lower, got.Deadline, want.Deadline)
				}
				_, gotOff := got.Deadline.Zone()
				_, wantOff := want.Deadline.Zone()
				if gotOff != wantOff {
					t.Errorf("%s: zone offset %d, want %d", lower, gotOff, wantOff)
				}
			}
		})
	}
}

func TestReason(t *testing.T) {
	tests := []struct {
		name  string
		value string
		want  string
		ok    bool
	}{
		{"1024 bytes", q(rep("r", 1024)), rep("r", 1024), true},
		{"1025 bytes", q(rep("r", 1025)), "", false},
		{"512 two-byte chars = 1024 bytes", q(rep("é", 512)), rep("é", 512), true},
		{"513 two-byte chars = 1026 bytes", q(rep("é", 513)), "", false},
		{"escapes count decoded bytes", `"` + rep(`\u00e9`, 512) + `"`, rep("é", 512), true},
		{"escapes over limit", `"` + rep(`\u00e9`, 513) + `"`, "", false},
		{"free text", `"operator: stop it / now (100%)\nthanks"`, "operator: stop it / now (100%)\nthanks", true},
		{"null", `null`, "", true},
		{"empty", `""`, "", true},
		{"number", `500`, "", false},
		{"array", `["a"]`, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode([]byte(body("reason", tt.value)), testMeta, Defaults{})
			field := "reason"
			if tt.ok {
				field = ""
			}
			checkField(t, err, field)
			if c.Reason != tt.want {
				t.Errorf("Reason = %.40q..., want %.40q...", c.Reason, tt.want)
			}
		})
	}
}

func TestDecodeValidCommand(t *testing.T) {
	b := `{"command_id":"cmd-42","project_id":"proj-1","workspace":"ws-1","script_name":"nightly_load",` +
		`"instance_id":"inst-9","deadline":"2030-01-02T03:04:05Z","reason":"maintenance","priority":3}`
	c, err := Decode([]byte(b), testMeta, Defaults{ProjectID: "other", Workspace: "other"})
	if err != nil {
		t.Fatal(err)
	}
	want := Command{
		ID: "cmd-42", ProjectID: "proj-1", Workspace: "ws-1", ScriptName: "nightly_load",
		InstanceID: "inst-9", Deadline: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC), HasDeadline: true,
		Reason: "maintenance",
	}
	if c != want {
		t.Errorf("Decode = %+v,\nwant     %+v", c, want)
	}
}

func TestErrorOrder(t *testing.T) {
	// Every field broken; fixing them one at a time in contract order must
	// move the reported field along that order, whatever the member order.
	bad := map[string]string{
		"command_id": `"a b"`, "project_id": `"a b"`, "workspace": `"a b"`, "script_name": `".."`,
		"instance_id": `"a b"`, "deadline": `"soon"`, "reason": q(rep("r", 1025)),
	}
	good := map[string]string{
		"command_id": `"c"`, "project_id": `"p"`, "workspace": `"w"`, "script_name": `"s"`,
		"instance_id": `"i"`, "deadline": `"2030-01-02T03:04:05Z"`, "reason": `"r"`,
	}
	for fixed := 0; fixed <= len(fieldOrder); fixed++ {
		for _, reverse := range []bool{false, true} {
			var members []string
			for i, f := range fieldOrder {
				v := bad[f]
				if i < fixed {
					v = good[f]
				}
				members = append(members, `"`+f+`":`+v)
			}
			if reverse {
				for i, j := 0, len(members)-1; i < j; i, j = i+1, j-1 {
					members[i], members[j] = members[j], members[i]
				}
			}
			b := "{" + strings.Join(members, ",") + "}"
			_, err := Decode([]byte(b), testMeta, Defaults{})
			want := ""
			if fixed < len(fieldOrder) {
				want = fieldOrder[fixed]
			}
			checkField(t, err, want)
		}
	}
}

// The zero instant is a deadline like any other (and long past); Go's
// zero time must not make it read as absent.
func TestZeroInstantIsADeadline(t *testing.T) {
	for _, d := range []string{"0001-01-01T00:00:00Z", "0001-01-01T01:00:00+01:00"} {
		c, err := Decode([]byte(`{"project_id":"p","script_name":"s","instance_id":"i","deadline":"`+d+`"}`), testMeta, Defaults{})
		if err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		if !c.HasDeadline || !c.Deadline.IsZero() {
			t.Errorf("%s: HasDeadline %v, Deadline %v", d, c.HasDeadline, c.Deadline)
		}
	}
	c, err := Decode([]byte(`{"project_id":"p","script_name":"s","instance_id":"i"}`), testMeta, Defaults{})
	if err != nil || c.HasDeadline {
		t.Errorf("no deadline: HasDeadline %v, err %v", c.HasDeadline, err)
	}
}

func TestPartialCommandOnRejection(t *testing.T) {
	defs := Defaults{ProjectID: "def-proj", Workspace: "def-ws"}
	t.Run("field error keeps the good fields", func(t *testing.T) {
		b := `{"command_id":"cmd-1","script_name":"a/b","instance_id":"inst-1","deadline":"2030-01-02T03:04:05Z","reason":"why"}`
		c, err := Decode([]byte(b), testMeta, defs)
		checkField(t, err, "script_name")
		want := Command{ID: "cmd-1", ProjectID: "def-proj", Workspace: "def-ws", InstanceID: "inst-1",
			Deadline: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC), HasDeadline: true, Reason: "why"}
		if c != want {
			t.Errorf("Decode = %+v,\nwant     %+v", c, want)
		}
	})
	t.Run("later bad fields are left out too", func(t *testing.T) {
		b := `{"project_id":"bad/proj","script_name":"job","instance_id":"i.1","reason":"` + rep("r", 2000) + `"}`
		c, err := Decode([]byte(b), testMeta, defs)
		checkField(t, err, "project_id")
		want := Command{ID: "msg-1", Workspace: "def-ws", ScriptName: "job"}
		if c != want {
			t.Errorf("Decode = %+v,\nwant     %+v", c, want)
		}
	})
	t.Run("bad command_id keeps the envelope id", func(t *testing.T) {
		c, err := Decode([]byte(body("command_id", `"no spaces"`)), testMeta, defs)
		checkField(t, err, "command_id")
		want := Command{ID: "msg-1", ProjectID: "proj-1", Workspace: "def-ws", ScriptName: "job", InstanceID: "inst-1"}
		if c != want {
			t.Errorf("Decode = %+v,\nwant     %+v", c, want)
		}
	})
	t.Run("body error holds only the id", func(t *testing.T) {
		c, err := Decode([]byte(`{"script_name":"job"`), testMeta, defs)
		checkField(t, err, "body")
		if c != (Command{ID: "msg-1"}) {
			t.Errorf("Decode = %+v, want only the ID", c)
		}
	})
}

func TestValidationErrorMessage(t *testing.T) {
	_, err := Decode([]byte(body("script_name", `".."`)), testMeta, Defaults{})
	if got, want := err.Error(), `script_name: must not be "." or ".."`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	_, err = Decode([]byte(body("script_name", "-")), testMeta, Defaults{})
	if got, want := err.Error(), `script_name: is required`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	_, err = Decode(make([]byte, MaxBodySize+1), testMeta, Defaults{})
	if got, want := err.Error(), `body: must be at most 65536 bytes, has 65537`; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestRulesNeverQuoteValues(t *testing.T) {
	// Rules end up in NATS headers and outcomes: no value, no control bytes.
	for _, c := range corpusCases() {
		_, err := Decode(c.body, testMeta, Defaults{})
		msg := err.Error()
		for _, r := range msg {
			if r < 0x20 || r == 0x7f {
				t.Errorf("%s: error %q holds a control character", c.name, msg)
				break
			}
		}
		if len(msg) > 200 {
			t.Errorf("%s: error is %d bytes long", c.name, len(msg))
		}
	}
}

func TestDefaultsValidate(t *testing.T) {
	tests := []struct {
		d     Defaults
		field string
	}{
		{Defaults{}, ""},
		{Defaults{ProjectID: "p", Workspace: "w"}, ""},
		{Defaults{ProjectID: rep("p", 64), Workspace: rep("w", 64)}, ""},
		{Defaults{ProjectID: rep("p", 65)}, "project_id"},
		{Defaults{ProjectID: "a b"}, "project_id"},
		{Defaults{Workspace: "a/b"}, "workspace"},
		{Defaults{Workspace: rep("w", 65)}, "workspace"},
	}
	for _, tt := range tests {
		checkField(t, tt.d.Validate(), tt.field)
	}
}

func TestDecodeDoesNotRetainBody(t *testing.T) {
	b := []byte(`{"command_id":"cmd-1","project_id":"proj-1","workspace":"ws-1","script_name":"job","instance_id":"inst-1","reason":"why"}`)
	c, err := Decode(b, testMeta, Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	before := c
	for i := range b {
		b[i] = 'X'
	}
	if c != before || c.ScriptName != "job" || c.Reason != "why" || c.ID != "cmd-1" {
		t.Errorf("command changed with the body: %+v", c)
	}
}
