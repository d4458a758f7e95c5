package command

import (
	"encoding/base64"
	"strings"
)

// InstanceKey returns a stable key for the instance this command stops:
// (project, workspace, script, instance) after defaults. Two commands get the
// same key exactly when the four values are equal, byte for byte.
//
// The key is four tokens joined by '.', in that order. Each token is
//
//   - "_" when the value is empty (only workspace can be, in a decoded command);
//   - the value itself when it is made only of A-Z a-z 0-9 - (the charset of
//     project_id, workspace and instance_id, and of many script names);
//   - otherwise "=" followed by the unpadded base64url encoding of the value's
//     UTF-8 bytes (e.g. a script name with '_', '.' or non-ASCII letters).
//
// No token contains '.', and the three forms cannot be mistaken for one
// another ("_" and '=' are outside the plain charset; base64url of a
// non-empty value is at least two characters), so the key is unambiguous. It
// uses only A-Z a-z 0-9 - _ = . and has no empty token, which makes it a
// valid NATS key-value key (and subject suffix) as it is; callers may add
// their own prefix. The format is fixed: keys written by one version are
// found by the next.
//
// Example: project "p1", no workspace, script "nightly_load", instance "i-9"
// gives "p1._.=bmlnaHRseV9sb2Fk.i-9".
func (c Command) InstanceKey() string {
	var b strings.Builder
	b.Grow(len(c.ProjectID) + len(c.Workspace) + len(c.InstanceID) + base64.RawURLEncoding.EncodedLen(len(c.ScriptName)) + 8)
	writeKeyToken(&b, c.ProjectID)
	b.WriteByte('.')
	writeKeyToken(&b, c.Workspace)
	b.WriteByte('.')
	writeKeyToken(&b, c.ScriptName)
	b.WriteByte('.')
	writeKeyToken(&b, c.InstanceID)
	return b.String()
}

func writeKeyToken(b *strings.Builder, s string) {
	if s == "" {
		b.WriteByte('_')
		return
	}
	plain := true
	for i := 0; i < len(s); i++ {
		if !isTokenByte(s[i]) {
			plain = false
			break
		}
	}
	if plain {
		b.WriteString(s)
		return
	}
	b.WriteByte('=')
	enc := make([]byte, base64.RawURLEncoding.EncodedLen(len(s)))
	base64.RawURLEncoding.Encode(enc, []byte(s))
	b.Write(enc)
}
