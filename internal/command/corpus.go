package command

import "strings"

// corpusCase is one invalid body and the field Decode must blame.
type corpusCase struct {
	name  string
	field string
	body  []byte
}

// Corpus returns hand-written stop-command bodies that Decode must reject,
// whatever the envelope and whatever defaults are configured: wrong types,
// null or missing required fields, deep nesting, invalid UTF-8, NUL bytes,
// bodies over 64 KiB, "..", "%2F", 10 KB names, bad deadlines, long reasons,
// bad command ids, non-object JSON, an empty body and trailing garbage. Other
// test suites publish them at volume; each call returns fresh slices the
// caller may keep or modify.
func Corpus() [][]byte {
	cases := corpusCases()
	out := make([][]byte, len(cases))
	for i, c := range cases {
		out[i] = c.body
	}
	return out
}

func corpusCases() []corpusCase {
	const base = `"project_id":"proj-1","workspace":"ws-1","instance_id":"inst-1"`
	// with builds an object from base plus the given members.
	with := func(members string) []byte {
		return []byte(`{` + base + `,` + members + `}`)
	}
	withScript := func(members string) []byte {
		return with(`"script_name":"job",` + members)
	}
	rep := strings.Repeat
	cases := []corpusCase{
		// The body as a whole.
		{"empty", "body", []byte{}},
		{"whitespace", "body", []byte(" \n\t ")},
		{"null", "body", []byte(`null`)},
		{"array", "body", []byte(`[{"script_name":"job","instance_id":"i"}]`)},
		{"string", "body", []byte(`"job"`)},
		{"number", "body", []byte(`12345`)},
		{"bool", "body", []byte(`true`)},
		{"truncated", "body", []byte(`{"project_id":"p","script_name":"job","instance_id":"i"`)},
		{"trailing garbage", "body", []byte(`{"project_id":"p","script_name":"job","instance_id":"i"} x`)},
		{"two objects", "body", []byte(`{"project_id":"p","script_name":"job","instance_id":"i"}{"script_name":"b"}`)},
		{"single quotes", "body", []byte(`{'project_id':'p','script_name':'job','instance_id':'i'}`)},
		{"trailing comma", "body", []byte(`{"project_id":"p","script_name":"job","instance_id":"i",}`)},
		{"comment", "body", []byte(`{"project_id":"p",/* c */"script_name":"job","instance_id":"i"}`)},
		{"NaN", "body", withScript(`"x":NaN`)},
		{"BOM", "body", append([]byte("\xef\xbb\xbf"), withScript(`"x":1`)...)},
		{"invalid UTF-8 byte", "body", with(`"script_name":"jo` + "\xff" + `b"`)},
		{"overlong UTF-8", "body", with(`"script_name":"a` + "\xc0\xaf" + `b"`)},
		{"UTF-8 surrogate", "body", with(`"script_name":"a` + "\xed\xa0\x80" + `"`)},
		{"invalid UTF-8 in unknown key", "body", withScript(`"k` + "\xfe" + `":1`)},
		{"truncated UTF-8", "body", with(`"script_name":"` + "\xe4\xb8" + `"`)},
		{"raw NUL in string", "body", with(`"script_name":"a` + "\x00" + `b"`)},
		{"raw NUL before object", "body", append([]byte{0}, withScript(`"x":1`)...)},
		{"raw newline in string", "body", with(`"script_name":"a` + "\n" + `b"`)},
		{"over 64 KiB by one", "body", padTo(withScript(`"pad":""`), MaxBodySize+1)},
		{"1 MiB", "body", padTo(withScript(`"pad":""`), 1<<20)},
		{"nesting 10001 arrays", "body", withScript(`"x":` + rep("[", 10001) + rep("]", 10001))},
		{"nesting 10001 objects", "body", []byte(rep(`{"a":`, 10000) + `{` + base + `,"script_name":"job"}` + rep("}", 10000))},
		{"nesting 10000 arrays top level", "body", []byte(rep("[", 10000) + rep("]", 10000))},
		{"unclosed nesting", "body", []byte(`{"x":` + rep("[", 60000))},

		// command_id.
		{"command_id space", "command_id", withScript(`"command_id":"has space"`)},
		{"command_id slash", "command_id", withScript(`"command_id":"a/b"`)},
		{"command_id 129", "command_id", withScript(`"command_id":"` + rep("c", 129) + `"`)},
		{"command_id number", "command_id", withScript(`"command_id":42`)},
		{"command_id unicode", "command_id", withScript(`"command_id":"cmd-ü"`)},
		{"command_id object", "command_id", withScript(`"command_id":{"id":"x"}`)},
		{"command_id NUL", "command_id", withScript(`"command_id":"a\u0000"`)},

		// project_id.
		{"project_id underscore", "project_id", []byte(`{"project_id":"proj_1","script_name":"job","instance_id":"i"}`)},
		{"project_id 65", "project_id", []byte(`{"project_id":"` + rep("p", 65) + `","script_name":"job","instance_id":"i"}`)},
		{"project_id %2F", "project_id", []byte(`{"project_id":"a%2Fb","script_name":"job","instance_id":"i"}`)},
		{"project_id bool", "project_id", []byte(`{"project_id":true,"script_name":"job","instance_id":"i"}`)},
		{"project_id path", "project_id", []byte(`{"project_id":"../admin","script_name":"job","instance_id":"i"}`)},

		// workspace.
		{"workspace space", "workspace", []byte(`{"project_id":"p","workspace":"ws 1","script_name":"job","instance_id":"i"}`)},
		{"workspace 65", "workspace", []byte(`{"project_id":"p","workspace":"` + rep("w", 65) + `","script_name":"job","instance_id":"i"}`)},
		{"workspace array", "workspace", []byte(`{"project_id":"p","workspace":["ws-1"],"script_name":"job","instance_id":"i"}`)},
		{"workspace CRLF", "workspace", []byte(`{"project_id":"p","workspace":"ws\r\nX-Evil: 1","script_name":"job","instance_id":"i"}`)},

		// script_name.
		{"script_name missing", "script_name", with(`"reason":"no script"`)},
		{"script_name null", "script_name", with(`"script_name":null`)},
		{"script_name empty", "script_name", with(`"script_name":""`)},
		{"script_name dot", "script_name", with(`"script_name":"."`)},
		{"script_name dotdot", "script_name", with(`"script_name":".."`)},
		{"script_name slash", "script_name", with(`"script_name":"a/b"`)},
		{"script_name %2F", "script_name", with(`"script_name":"..%2F..%2Fadmin"`)},
		{"script_name traversal", "script_name", with(`"script_name":"../../etc"`)},
		{"script_name space", "script_name", with(`"script_name":"my job"`)},
		{"script_name escaped NUL", "script_name", with(`"script_name":"a\u0000b"`)},
		{"script_name control", "script_name", with(`"script_name":"a\u0007b\n"`)},
		{"script_name backslash", "script_name", with(`"script_name":"a\\b"`)},
		{"script_name query", "script_name", with(`"script_name":"job?x=1#f"`)},
		{"script_name 10 KB", "script_name", with(`"script_name":"` + rep("a", 10<<10) + `"`)},
		{"script_name 129 letters", "script_name", with(`"script_name":"` + rep("é", 129) + `"`)},
		{"script_name Arabic-Indic digits", "script_name", with(`"script_name":"job-١٢٣"`)},
		{"script_name emoji", "script_name", with(`"script_name":"job🚀"`)},
		{"script_name number", "script_name", with(`"script_name":7`)},
		{"script_name object", "script_name", with(`"script_name":{"name":"job"}`)},
		{"script_name duplicate", "script_name", with(`"script_name":"job","script_name":"other"`)},
		{"script_name escaped duplicate", "script_name", with(`"script_name":"job","script\u005fname":"job"`)},

		// instance_id.
		{"instance_id missing", "instance_id", []byte(`{"project_id":"p","script_name":"job"}`)},
		{"instance_id null", "instance_id", []byte(`{"project_id":"p","script_name":"job","instance_id":null}`)},
		{"instance_id dot", "instance_id", []byte(`{"project_id":"p","script_name":"job","instance_id":"x.y"}`)},
		{"instance_id 129", "instance_id", []byte(`{"project_id":"p","script_name":"job","instance_id":"` + rep("1", 129) + `"}`)},
		{"instance_id number", "instance_id", []byte(`{"project_id":"p","script_name":"job","instance_id":12345}`)},
		{"instance_id traversal", "instance_id", []byte(`{"project_id":"p","script_name":"job","instance_id":"i/../.."}`)},

		// deadline.
		{"deadline words", "deadline", withScript(`"deadline":"tomorrow"`)},
		{"deadline space", "deadline", withScript(`"deadline":"2030-01-02 03:04:05Z"`)},
		{"deadline no zone", "deadline", withScript(`"deadline":"2030-01-02T03:04:05"`)},
		{"deadline unix", "deadline", withScript(`"deadline":1900000000`)},
		{"deadline comma", "deadline", withScript(`"deadline":"2030-01-02T03:04:05,5Z"`)},
		{"deadline month 13", "deadline", withScript(`"deadline":"2030-13-01T00:00:00Z"`)},
		{"deadline offset 24h", "deadline", withScript(`"deadline":"2030-01-02T03:04:05+24:00"`)},

		// reason.
		{"reason 1025 bytes", "reason", withScript(`"reason":"` + rep("r", 1025) + `"`)},
		{"reason 600 two-byte chars", "reason", withScript(`"reason":"` + rep("é", 600) + `"`)},
		{"reason number", "reason", withScript(`"reason":500`)},
	}
	return cases
}

// padTo returns obj (a JSON object ending in `"pad":""}`) with the pad
// string grown so the body is exactly n bytes.
func padTo(obj []byte, n int) []byte {
	head := obj[:len(obj)-2] // drop `"}`
	out := make([]byte, 0, n)
	out = append(out, head...)
	for len(out) < n-2 {
		out = append(out, 'x')
	}
	return append(out, '"', '}')
}
