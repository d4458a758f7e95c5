package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Causes, the machine-readable half of an outcome.
const (
	CauseOK               = "ok"
	CauseDLFError         = "dlf_error"
	CauseRetriesExhausted = "retries_exhausted"
	CauseInvalidCommand   = "invalid_command"
	CauseDeadlinePassed   = "deadline_passed"
	CauseAlreadyStopped   = "already_stopped"
)

// Outcome is the event published once per command (contract section 4).
// Fields with nothing to say are left out; http_status and attempts are
// always present because 0 is meaningful for them.
type Outcome struct {
	CommandID    string `json:"command_id,omitempty"`
	ProjectID    string `json:"project_id,omitempty"`
	Workspace    string `json:"workspace,omitempty"`
	ScriptName   string `json:"script_name,omitempty"`
	InstanceID   string `json:"instance_id,omitempty"`
	Reason       string `json:"reason,omitempty"`
	Status       string `json:"status"`
	Cause        string `json:"cause"`
	HTTPStatus   int    `json:"http_status"`
	ErrorCode    string `json:"error_code,omitempty"`
	ErrorMsg     string `json:"error_msg,omitempty"`
	Detail       string `json:"detail,omitempty"`
	DLFRequestID string `json:"dlf_request_id,omitempty"`
	Attempts     int    `json:"attempts"`
	ReceivedAt   string `json:"received_at,omitempty"`
	FinishedAt   string `json:"finished_at"`
	DurationMS   int64  `json:"duration_ms"`
	WorkerID     string `json:"worker_id,omitempty"`
}

// timeFormat is RFC 3339 in UTC that always shows fractional seconds,
// so consumers can parse every event with one layout.
const timeFormat = "2006-01-02T15:04:05.000000000Z07:00"

// FormatTime renders t the way outcome events and dead letters do.
func FormatTime(t time.Time) string { return t.UTC().Format(timeFormat) }

// Dead-letter headers (contract section 5).
const (
	HeaderStatus          = "Dlf-Status"
	HeaderCause           = "Dlf-Cause"
	HeaderErrorCode       = "Dlf-Error-Code"
	HeaderErrorMsg        = "Dlf-Error-Msg"
	HeaderHTTPStatus      = "Dlf-Http-Status"
	HeaderAttempts        = "Dlf-Attempts"
	HeaderOriginalSubject = "Dlf-Original-Subject"
	HeaderOriginalSeq     = "Dlf-Original-Seq"
	HeaderFailedAt        = "Dlf-Failed-At"
	HeaderDetail          = "Dlf-Detail"
	HeaderRedriveOf       = "Dlf-Redrive-Of"
)

// publisher stores outcomes and dead letters and waits for JetStream's
// stored-ack, because acking a command before that could lose it.
type publisher struct {
	js            jetstream.JetStream
	outcomePrefix string
	deadSubject   string
	deadStream    string
}

// publishOutcome stores o. A repeat within the duplicate window (the same
// Nats-Msg-Id) is dropped by the stream; the ack then says so and names
// the outcome stored first (see storedOutcome).
func (p *publisher) publishOutcome(ctx context.Context, o *Outcome) (*jetstream.PubAck, error) {
	body, err := json.Marshal(o)
	if err != nil {
		return nil, fmt.Errorf("encode outcome: %w", err)
	}
	m := nats.NewMsg(p.outcomePrefix + "." + o.Status)
	m.Data = body
	m.Header.Set(jetstream.MsgIDHeader, o.CommandID)
	ack, err := p.js.PublishMsg(ctx, m)
	if err != nil {
		return nil, fmt.Errorf("publish outcome: %w", err)
	}
	return ack, nil
}

// defaultDuplicates is JetStream's duplicate window when a stream does not
// set one, for when the stream cannot even be looked up.
const defaultDuplicates = 2 * time.Minute

// storedOutcome reads the outcome JetStream stored at seq in stream, the
// one a duplicate publish was dropped for. Only that path reads it: an
// earlier delivery stored it and then died before its dead letter or its
// decision record, and this delivery may have decided otherwise (its
// DLF.6205 is the first delivery's stop, say).
//
// It also returns when the stream drops that id from its duplicate window.
func (p *publisher) storedOutcome(ctx context.Context, stream string, seq uint64, id string) (*Outcome, time.Time, error) {
	s, err := p.js.Stream(ctx, stream)
	if err != nil {
		return nil, time.Now().Add(defaultDuplicates), fmt.Errorf("read stored outcome: %w", err)
	}
	window := s.CachedInfo().Config.Duplicates
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		// Then the id is surely free once a whole window has passed.
		return nil, time.Now().Add(window), fmt.Errorf("read stored outcome %s #%d: %w", stream, seq, err)
	}
	free := m.Time.Add(window)
	if got := m.Header.Get(jetstream.MsgIDHeader); got != id {
		return nil, free, fmt.Errorf("read stored outcome %s #%d: it is for command %q", stream, seq, got)
	}
	var o Outcome
	if err := json.Unmarshal(m.Data, &o); err != nil {
		return nil, free, fmt.Errorf("read stored outcome %s #%d: %w", stream, seq, err)
	}
	if o.Status == "" {
		return nil, free, fmt.Errorf("read stored outcome %s #%d: no status", stream, seq)
	}
	return &o, free, nil
}

// publishDead stores the original command bytes, unchanged, so that a
// redrive is a plain republish of the body.
func (p *publisher) publishDead(ctx context.Context, o *Outcome, original []byte, subject string, seq uint64) error {
	m := nats.NewMsg(p.deadSubject)
	m.Data = original
	h := m.Header
	h.Set(jetstream.MsgIDHeader, o.CommandID)
	setIf := func(k, v string) {
		if v != "" {
			h.Set(k, v)
		}
	}
	setIf(HeaderStatus, o.Status)
	setIf(HeaderCause, o.Cause)
	setIf(HeaderErrorCode, o.ErrorCode)
	setIf(HeaderErrorMsg, headerSafe(o.ErrorMsg))
	h.Set(HeaderHTTPStatus, strconv.Itoa(o.HTTPStatus))
	h.Set(HeaderAttempts, strconv.Itoa(o.Attempts))
	setIf(HeaderOriginalSubject, subject)
	h.Set(HeaderOriginalSeq, strconv.FormatUint(seq, 10))
	h.Set(HeaderFailedAt, o.FinishedAt)
	setIf(HeaderDetail, headerSafe(o.Detail))
	fitPayload(m, p.js.Conn().MaxPayload())
	_, err := p.js.PublishMsg(ctx, m)
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamMessageExceedsMaximum {
		// The stream's own max_msg_size, below the server's max_payload
		// (only a command over 64 KiB, so a rejected one, can meet it:
		// start-up refuses a smaller limit). Cut to fit it too, or the
		// command would be returned for ever (found by review).
		if limit := p.deadLimit(ctx); limit > 0 {
			fitPayload(m, limit)
			_, err = p.js.PublishMsg(ctx, m)
		}
	}
	if err != nil {
		return fmt.Errorf("publish dead letter: %w", err)
	}
	return nil
}

// deadLimit is the dead-letter stream's max_msg_size, 0 when it has none
// or cannot be read. Looked up by its configured name: the worker's NATS
// user may read that stream's info (deploy/nats), not list streams.
func (p *publisher) deadLimit(ctx context.Context) int64 {
	s, err := p.js.Stream(ctx, p.deadStream)
	if err != nil {
		return 0
	}
	return int64(max(s.CachedInfo().Config.MaxMsgSize, 0))
}

// HeaderBodyTruncated marks a dead letter whose body had to be cut to fit
// the server's max payload; its value is the original size in bytes.
const HeaderBodyTruncated = "Dlf-Body-Truncated"

// fitPayload cuts the body of m when body and headers exceed maxPayload
// (the server's, or the dead-letter stream's max_msg_size when smaller).
// Only an invalid command within a few hundred bytes of the limit can
// get there (a valid one is at most 64 KiB). The contract wants the body
// unchanged, but a dead letter that can never be stored would return its
// command forever; a marked, truncated copy is the lesser evil, and the
// full command stays in the stop stream's history until it is acked.
func fitPayload(m *nats.Msg, maxPayload int64) {
	if maxPayload <= 0 {
		return
	}
	hdr := 64 // "NATS/1.0\r\n", the final CRLF, and the header we may add
	for k, vs := range m.Header {
		for _, v := range vs {
			hdr += len(k) + len(v) + 4
		}
	}
	if int64(hdr+len(m.Data)) <= maxPayload {
		return
	}
	keep := int(maxPayload) - hdr - 64
	if keep < 0 {
		keep = 0
	}
	m.Header.Set(HeaderBodyTruncated, strconv.Itoa(len(m.Data)))
	m.Data = m.Data[:keep]
}

// headerSafe keeps a header value on one line: NATS headers are
// line-based, and a CR or LF from a DLF error message would break them.
func headerSafe(s string) string {
	clean := true
	for i := 0; i < len(s); i++ {
		if s[i] == '\r' || s[i] == '\n' {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	b := []byte(s)
	for i, c := range b {
		if c == '\r' || c == '\n' {
			b[i] = ' '
		}
	}
	return string(b)
}
