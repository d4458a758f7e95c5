package consumer

import (
	"bytes"
	"encoding/json"
	"strconv"
)

// The few JSON documents the state bucket exchanges on every command are
// written and read by hand when their content allows; the reflection of
// encoding/json cost a visible share of the reliability budget. Anything
// unusual takes encoding/json, so the output is always what it would
// produce, and the answers JetStream sends are read as it would read them
// (parsePubAck is lenient with shapes JetStream never sends: a repeated
// key, leading zeros, text after the object; found by review).

// appendJSONString appends s as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x80 || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// decidedIndexDoc is the id index entry markDecided writes: the JSON of
// stateDoc{Cmds: {id: e}}.
func decidedIndexDoc(id string, e cmdEntry) []byte {
	// Every field but the four written by hand sends it to encoding/json
	// (TestDecidedIndexDocIsEncodingJSON sets each field of cmdEntry).
	if e.Unanswered || e.Delivery != 0 || e.Outcome != nil || e.OutcomeStored || e.OwnStop || e.At != 0 || e.MarkRev != nil ||
		e.LastHTTPStatus != 0 || e.LastErrorCode != "" || e.LastErrorMsg != "" || e.LastRequestID != "" ||
		e.Seq != 0 || e.Inst != "" || e.Held {
		b, _ := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{id: &e}})
		return b
	}
	b := make([]byte, 0, 96+len(id))
	b = append(b, `{"cmds":{`...)
	b = appendJSONString(b, id)
	b = append(b, `:{"p":`...)
	b = appendJSONString(b, e.Phase)
	b = append(b, `,"a":`...)
	b = strconv.AppendInt(b, int64(e.Attempts), 10)
	if e.Status != "" {
		b = append(b, `,"s":`...)
		b = appendJSONString(b, e.Status)
	}
	if e.Cause != "" {
		b = append(b, `,"c":`...)
		b = appendJSONString(b, e.Cause)
	}
	return append(b, "}}}"...)
}

// sentMarkDoc is the JSON of the "sent" mark markSent writes:
// stateDoc{Cmds: {id: {Phase: sent, Delivery: n, Seq: seq, Inst: inst}}}.
func sentMarkDoc(id string, n, seq uint64, inst string) []byte {
	if n == 0 || seq == 0 || inst == "" { // left out as empty: not worth a case by hand
		b, _ := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{id: {Phase: phaseSent, Delivery: n, Seq: seq, Inst: inst}}})
		return b
	}
	b := make([]byte, 0, 64+len(id)+len(inst))
	b = append(b, `{"cmds":{`...)
	b = appendJSONString(b, id)
	b = append(b, `:{"p":"sent","a":0,"d":`...)
	b = strconv.AppendUint(b, n, 10)
	b = append(b, `,"q":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, `,"i":`...)
	b = appendJSONString(b, inst)
	return append(b, "}}}"...)
}

// stateDocJSON is the JSON of d. A document without command entries, as
// a first stop of an instance writes it, is written by hand.
func stateDocJSON(d *stateDoc) ([]byte, error) {
	if len(d.Cmds) != 0 {
		return json.Marshal(d)
	}
	// Room for all three fields, quotes, separators and the longest
	// number: 48 was one byte short of it, and every record grew once.
	b := make([]byte, 0, 64+len(d.StoppedBy)+len(d.StoppedAt))
	b = append(b, '{')
	if d.StoppedBy != "" {
		b = append(b, `"stopped_by":`...)
		b = appendJSONString(b, d.StoppedBy)
	}
	if d.StoppedAt != "" {
		if len(b) > 1 {
			b = append(b, ',')
		}
		b = append(b, `"stopped_at":`...)
		b = appendJSONString(b, d.StoppedAt)
	}
	if d.StoppedT != 0 {
		if len(b) > 1 {
			b = append(b, ',')
		}
		b = append(b, `"st":`...)
		b = strconv.AppendInt(b, d.StoppedT, 10)
	}
	return append(b, '}'), nil
}

// multiLastRequest is the JSON of a batched direct get of subjects.
func multiLastRequest(subjects []string) []byte {
	n := 32
	for _, s := range subjects {
		n += len(s) + 3
	}
	b := make([]byte, 0, n)
	b = append(b, `{"multi_last":[`...)
	for i, s := range subjects {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, s)
	}
	b = append(b, `],"batch":`...)
	b = strconv.AppendInt(b, int64(len(subjects)), 10)
	return append(b, '}')
}

// parsePubAck reads JetStream's answer to a publish. The common answer,
// {"stream":"…","seq":N} possibly with "domain" or "duplicate", is read
// by hand; anything holding an error, or not in that shape, by
// encoding/json.
func parsePubAck(data []byte) (pubAck, error) {
	if !bytes.Contains(data, []byte(`"error"`)) {
		if i := bytes.Index(data, []byte(`"seq":`)); i >= 0 {
			rest := data[i+len(`"seq":`):]
			j := 0
			for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
				j++
			}
			if j > 0 && j < len(rest) && (rest[j] == ',' || rest[j] == '}') {
				if seq, err := strconv.ParseUint(string(rest[:j]), 10, 64); err == nil {
					return pubAck{Seq: seq}, nil
				}
			}
		}
	}
	var ack pubAck
	err := json.Unmarshal(data, &ack)
	return ack, err
}
