package command

import (
	"errors"
	"strings"
	"testing"
)

// testMeta is the envelope most tests use.
var testMeta = Meta{MsgID: "msg-1", Stream: "DLF_STOP", Seq: 12}

// fieldOrder is the order bodies are built in (and errors reported in).
var fieldOrder = []string{"command_id", "project_id", "workspace", "script_name", "instance_id", "deadline", "reason"}

// body returns a valid command (project proj-1, script job, instance inst-1)
// with members overridden by raw JSON values; an override of "-" removes the
// member. Keys not in fieldOrder are appended in argument order.
func body(kv ...string) string {
	vals := map[string]string{
		"project_id":  `"proj-1"`,
		"script_name": `"job"`,
		"instance_id": `"inst-1"`,
	}
	var extra []string
	for i := 0; i+1 < len(kv); i += 2 {
		k, v := kv[i], kv[i+1]
		if !contains(fieldOrder, k) {
			extra = append(extra, k)
		}
		vals[k] = v
	}
	var b strings.Builder
	b.WriteByte('{')
	first := true
	for _, k := range append(append([]string{}, fieldOrder...), extra...) {
		v, ok := vals[k]
		if !ok || v == "-" {
			continue
		}
		if !first {
			b.WriteByte(',')
		}
		first = false
		b.WriteString(`"` + k + `":` + v)
	}
	b.WriteByte('}')
	return b.String()
}

func contains(s []string, x string) bool {
	for _, e := range s {
		if e == x {
			return true
		}
	}
	return false
}

// q quotes s as a JSON string without escaping non-ASCII characters.
func q(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20:
			b.WriteString(`\u00`)
			b.WriteByte("0123456789abcdef"[r>>4])
			b.WriteByte("0123456789abcdef"[r&15])
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// checkField asserts err is nil (want "") or a *ValidationError for field
// want, and returns it.
func checkField(t *testing.T, err error, want string) *ValidationError {
	t.Helper()
	if want == "" {
		if err != nil {
			t.Fatalf("Decode: unexpected error %v", err)
		}
		return nil
	}
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("Decode error = %v (%T), want *ValidationError for %s", err, err, want)
	}
	if ve.Field != want {
		t.Fatalf("Decode error = %q, want field %s", ve.Error(), want)
	}
	if ve.Rule == "" {
		t.Fatalf("Decode error for %s has an empty rule", want)
	}
	return ve
}
