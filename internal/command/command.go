package command

import (
	"strconv"
	"time"
)

// MaxBodySize is the largest command body accepted, in bytes (inclusive).
const MaxBodySize = 64 << 10

// Meta is what the message envelope says about a command.
type Meta struct {
	MsgID string // Nats-Msg-Id header ("" if none)
	// Redrive says the message carries the Dlf-Redrive-Of header, even
	// empty: a redrive whose old id was left out is a redrive still.
	Redrive bool
	Stream  string // stream name, e.g. "DLF_STOP"
	Seq     uint64 // stream sequence
}

// Defaults are the worker's configured fallbacks for fields a command may
// leave out: HUAWEICLOUD_SDK_PROJECT_ID and DLF_WORKSPACE. Empty means none.
type Defaults struct {
	ProjectID string
	Workspace string
}

// Command is a decoded stop command with defaults applied. Returned by Decode
// without error, every field satisfies its rule; Workspace is "" when neither
// the command nor the configuration names one; HasDeadline says whether the
// command set a deadline.
type Command struct {
	ID         string
	ProjectID  string
	Workspace  string
	ScriptName string
	InstanceID string
	Deadline   time.Time
	// HasDeadline, not a zero Deadline, says the command has one: the
	// valid deadline 0001-01-01T00:00:00Z is Go's zero time, and long past.
	HasDeadline bool
	Reason      string
	// SeqID says ID is "<stream>-<seq>": the message's place in its
	// stream rather than an id its publisher chose. A stream deleted and
	// created again numbers its messages from 1 again, so such an id does
	// not name one command for ever.
	SeqID bool
}

// Decode parses and validates a command body per contract section 3.
//
// The ID is the body's command_id; without one (or on a redrive, when
// m.Redrive) it is m.MsgID when that follows the command_id rule,
// else "<stream>-<seq>".
//
// On error, which is always a *ValidationError for the first broken field in
// the order body, command_id, project_id, workspace, script_name,
// instance_id, deadline, reason, the returned Command still holds a valid ID
// (never a rejected body command_id) and every field that was read and
// passed its rule, defaults applied, so the rejection can echo them.
//
// Decode does not keep body and is safe for concurrent use.
func Decode(body []byte, m Meta, d Defaults) (Command, error) {
	c := EnvelopeCommand(m)
	var r rawFields
	if err := scanBody(body, &r); err != nil {
		return c, err
	}

	var first *ValidationError
	fail := func(f int, rule string) {
		if first == nil {
			first = &ValidationError{Field: fieldNames[f], Rule: rule}
		}
	}

	// command_id: validated even on a redrive, used only without one.
	if s, ok, rule := r.str(fCommandID); rule != "" {
		fail(fCommandID, rule)
	} else if ok && !ValidID(s) {
		fail(fCommandID, ruleID)
	} else if ok && !m.Redrive {
		c.ID, c.SeqID = s, false
	}

	switch s, ok, rule := r.str(fProjectID); {
	case rule != "":
		fail(fProjectID, rule)
	case ok && validToken(s, maxProjectLen):
		c.ProjectID = s
	case ok:
		fail(fProjectID, ruleToken64)
	case d.ProjectID == "":
		fail(fProjectID, ruleNoProject)
	case validToken(d.ProjectID, maxProjectLen):
		c.ProjectID = d.ProjectID
	default:
		fail(fProjectID, ruleDefProject)
	}

	switch s, ok, rule := r.str(fWorkspace); {
	case rule != "":
		fail(fWorkspace, rule)
	case ok && validToken(s, maxWSLen):
		c.Workspace = s
	case ok:
		fail(fWorkspace, ruleToken64)
	case d.Workspace == "":
		// No workspace: the DLF call goes without the header.
	case validToken(d.Workspace, maxWSLen):
		c.Workspace = d.Workspace
	default:
		fail(fWorkspace, ruleDefWS)
	}

	switch s, ok, rule := r.str(fScriptName); {
	case rule != "":
		fail(fScriptName, rule)
	case !ok:
		fail(fScriptName, ruleRequired)
	case !validScriptChars(s):
		fail(fScriptName, ruleScript)
	case s == "." || s == "..":
		fail(fScriptName, ruleDots)
	default:
		c.ScriptName = s
	}

	switch s, ok, rule := r.str(fInstanceID); {
	case rule != "":
		fail(fInstanceID, rule)
	case !ok:
		fail(fInstanceID, ruleRequired)
	case !validToken(s, maxInstanceLen):
		fail(fInstanceID, ruleToken128)
	default:
		c.InstanceID = s
	}

	if s, ok, rule := r.str(fDeadline); rule != "" {
		fail(fDeadline, rule)
	} else if ok {
		if t, good := parseDeadline(s); good {
			c.Deadline, c.HasDeadline = t, true
		} else {
			fail(fDeadline, ruleDeadline)
		}
	}

	if s, ok, rule := r.str(fReason); rule != "" {
		fail(fReason, rule)
	} else if ok && len(s) > maxReasonBytes {
		fail(fReason, ruleReason)
	} else if ok {
		c.Reason = s
	}

	if first != nil {
		return c, first
	}
	return c, nil
}

// EnvelopeCommand is the command as far as its envelope tells, with the
// id it gets from it: the Nats-Msg-Id header when that follows the
// command_id rule, else "<stream>-<seq>". Decode starts from it; a worker
// that cannot read a body at all can still name the command with it.
func EnvelopeCommand(m Meta) Command {
	if ValidID(m.MsgID) {
		return Command{ID: m.MsgID}
	}
	return Command{ID: streamSeqID(m.Stream, m.Seq), SeqID: true}
}

// streamSeqID returns "<stream>-<seq>" made to follow the command_id rule:
// bytes outside its charset become '_', and the stream part is cut so the
// whole fits 128 characters. "DLF_STOP", 12 gives "DLF_STOP-12".
func streamSeqID(stream string, seq uint64) string {
	suffix := strconv.AppendUint([]byte{'-'}, seq, 10) // at most 21 bytes
	n := min(len(stream), maxIDLen-len(suffix))
	b := make([]byte, 0, n+len(suffix))
	for i := 0; i < n; i++ {
		c := stream[i]
		if !isIDByte(c) {
			c = '_'
		}
		b = append(b, c)
	}
	return string(append(b, suffix...))
}
