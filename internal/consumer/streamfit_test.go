package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/testutil"
)

// Existing streams and a state bucket under which the worker cannot work,
// most of them losing commands without an outcome or a dead letter, are
// refused at start, naming the stream or bucket and the setting (found by
// review); settings at the edge of each rule are accepted, some with a
// warning. newEnv's worker gives up after 30s (RETRY_MAX_ELAPSED) with
// calls of at most 2s (DLF_TIMEOUT).
func TestSetupRefusesStreamsAndBucketsThatCannotWork(t *testing.T) {
	t.Parallel()
	const (
		stop, outcomes, dead, bucket = "DLF_STOP", "DLF_STOP_OUTCOMES", "DLF_STOP_DEAD", "KV_dlf_stop_state"
		bound                        = 32 * time.Second // RETRY_MAX_ELAPSED + DLF_TIMEOUT
	)
	sealed := func(c *jetstream.StreamConfig) { c.Sealed = true }
	noAck := func(c *jetstream.StreamConfig) { c.NoAck = true }
	// A duplicate window may not be longer than the max_age.
	maxAge := func(d time.Duration) func(*jetstream.StreamConfig) {
		return func(c *jetstream.StreamConfig) { c.MaxAge, c.Duplicates = d, min(c.Duplicates, d) }
	}
	transform := func(src, dest string) func(*jetstream.StreamConfig) {
		return func(c *jetstream.StreamConfig) {
			c.SubjectTransform = &jetstream.SubjectTransformConfig{Source: src, Destination: dest}
		}
	}
	for _, tc := range []struct {
		name   string
		stream string
		change func(*jetstream.StreamConfig)
		// mirror replaces the stream (or bucket) with a mirror of another.
		mirror bool
		// want: the error must name each (nil: Setup must succeed).
		want []string
		// warn: a warning whose message holds it must be logged.
		warn string
	}{
		{name: "sealed stop stream", stream: stop, change: sealed, want: []string{stop, "sealed"}},
		{name: "sealed outcome stream", stream: outcomes, change: sealed, want: []string{outcomes, "sealed"}},
		{name: "sealed dead-letter stream", stream: dead, change: sealed, want: []string{dead, "sealed"}},
		{name: "sealed bucket", stream: bucket, change: sealed, want: []string{"dlf_stop_state", "sealed"}},
		{name: "no-ack stop stream", stream: stop, change: noAck, want: []string{stop, "no_ack"}},
		{name: "no-ack outcome stream", stream: outcomes, change: noAck, want: []string{outcomes, "no_ack"}},
		{name: "no-ack dead-letter stream", stream: dead, change: noAck, want: []string{dead, "no_ack"}},
		{name: "no-ack bucket", stream: bucket, change: noAck, want: []string{"dlf_stop_state", "no_ack"}},
		{name: "mirror as stop stream", stream: stop, mirror: true, want: []string{stop, "mirror", "ORIGIN"}},
		{name: "mirror as outcome stream", stream: outcomes, mirror: true, want: []string{outcomes, "mirror"}},
		{name: "mirror as dead-letter stream", stream: dead, mirror: true, want: []string{dead, "mirror"}},
		{name: "mirror as bucket", stream: bucket, mirror: true, want: []string{"dlf_stop_state", "mirror", "KV_origin"}},

		{name: "stop stream ages out before the last attempt", stream: stop,
			change: maxAge(bound - time.Second), want: []string{stop, "max_age", "31s", "32s"}},
		{name: "stop stream max_age at the bound", stream: stop,
			change: maxAge(bound), warn: "max_age"},
		{name: "stop stream max_age above the bound", stream: stop,
			change: maxAge(bound + time.Second), warn: "max_age"},
		{name: "stop stream drops the oldest by count", stream: stop,
			change: func(c *jetstream.StreamConfig) { c.Discard, c.MaxMsgs = jetstream.DiscardOld, 1000 },
			want:   []string{stop, "discard old", "max_msgs 1000"}},
		{name: "stop stream drops the oldest by size", stream: stop,
			change: func(c *jetstream.StreamConfig) { c.Discard, c.MaxBytes = jetstream.DiscardOld, 1<<20 },
			want:   []string{stop, "discard old", "max_bytes 1048576"}},
		{name: "stop stream refuses new ones when full", stream: stop,
			change: func(c *jetstream.StreamConfig) { c.Discard, c.MaxMsgs, c.MaxBytes = jetstream.DiscardNew, 1000, 1<<20 }},
		{name: "stop stream drops the oldest per subject", stream: stop,
			change: func(c *jetstream.StreamConfig) { c.MaxMsgsPerSubject = 10 }, want: []string{stop, "max_msgs_per_subject", "10"}},
		{name: "stop stream drops the oldest per subject under discard new", stream: stop,
			change: func(c *jetstream.StreamConfig) { c.Discard, c.MaxMsgsPerSubject = jetstream.DiscardNew, 10 },
			want:   []string{stop, "max_msgs_per_subject", "discard_new_per_subject"}},
		{name: "stop stream refuses new ones per subject", stream: stop,
			change: func(c *jetstream.StreamConfig) {
				c.Discard, c.MaxMsgsPerSubject, c.DiscardNewPerSubject = jetstream.DiscardNew, 10, true
			}},

		{name: "dead letters of valid commands do not fit", stream: dead,
			change: func(c *jetstream.StreamConfig) { c.MaxMsgSize = minDeadMsgSize - 1 }, want: []string{dead, "max_msg_size", "73727"}},
		{name: "dead letters of valid commands just fit", stream: dead,
			change: func(c *jetstream.StreamConfig) { c.MaxMsgSize = minDeadMsgSize }},
		{name: "outcomes do not fit", stream: outcomes,
			change: func(c *jetstream.StreamConfig) { c.MaxMsgSize = minOutcomeMsgSize - 1 }, want: []string{outcomes, "max_msg_size", "32767"}},
		{name: "outcomes just fit", stream: outcomes,
			change: func(c *jetstream.StreamConfig) { c.MaxMsgSize = minOutcomeMsgSize }},

		{name: "stop subject rewritten", stream: stop, change: transform("dlf.stop.request", "dlf.stop.moved"),
			want: []string{stop, "subject_transform", "dlf.stop.moved"}},
		{name: "outcome subjects rewritten", stream: outcomes, change: transform("dlf.stop.outcome.*", "audit.{{wildcard(1)}}"),
			want: []string{outcomes, "subject_transform", "dlf.stop.outcome.stopped"}},
		{name: "every subject rewritten", stream: outcomes, change: transform("", "audit.>"),
			want: []string{outcomes, "subject_transform"}},
		{name: "other subjects rewritten", stream: outcomes,
			change: func(c *jetstream.StreamConfig) {
				c.Subjects = append(c.Subjects, "legacy.outcome")
				transform("legacy.outcome", "dlf.stop.outcome.legacy")(c)
			}},
		{name: "subject rewritten to itself", stream: stop, change: transform("dlf.stop.request", "dlf.stop.request")},

		{name: "bucket forgets during retries", stream: bucket,
			change: maxAge(29 * time.Second), want: []string{"dlf_stop_state", "ttl", "29s", "RETRY_MAX_ELAPSED"}},
		{name: "bucket TTL at RETRY_MAX_ELAPSED", stream: bucket,
			change: maxAge(30 * time.Second), warn: "STATE_TTL"},
		{name: "bucket TTL other than STATE_TTL", stream: bucket,
			change: maxAge(time.Hour), warn: "STATE_TTL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each on a server of its own, and nothing timed
			e := newEnv(t, nil)
			if tc.mirror {
				e.replaceWithMirror(t, tc.stream)
			} else {
				e.updateStream(t, tc.stream, tc.change)
			}
			core, logs := observer.New(zapcore.WarnLevel)
			log := zap.New(zapcore.NewTee(e.log.Core(), core))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := Setup(ctx, e.js, e.cfg, log)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Setup: %v; want it accepted", err)
				}
			} else {
				t.Logf("Setup: %v", err)
				if !errors.Is(err, ErrMismatch) {
					t.Fatalf("Setup: %v; want a mismatch naming %q", err, tc.want)
				}
				for _, w := range tc.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("Setup: %v; want it to name %q", err, w)
					}
				}
			}
			if tc.warn != "" && logs.FilterMessageSnippet(tc.warn).Len() == 0 {
				t.Errorf("no warning mentions %q; logged %v", tc.warn, logs.All())
			}
		})
	}
}

// replaceWithMirror replaces stream (or the bucket whose stream it is)
// with a mirror of another: a mirror cannot be made by an update.
func (e *env) replaceWithMirror(t *testing.T, stream string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if bucket, ok := strings.CutPrefix(stream, "KV_"); ok {
		if _, err := e.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "origin"}); err != nil {
			t.Fatal(err)
		}
		if err := e.js.DeleteKeyValue(ctx, bucket); err != nil {
			t.Fatal(err)
		}
		if _, err := e.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket,
			Mirror: &jetstream.StreamSource{Name: "origin"}}); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{Name: "ORIGIN", Subjects: []string{"origin.>"}}); err != nil {
		t.Fatal(err)
	}
	if err := e.js.DeleteStream(ctx, stream); err != nil {
		t.Fatal(err)
	}
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{Name: stream,
		Mirror: &jetstream.StreamSource{Name: "ORIGIN"}}); err != nil {
		t.Fatal(err)
	}
}

// minOutcomeMsgSize is a bound: an outcome with every field at its limit
// and full of characters JSON escapes, with its header, takes no more.
func TestOutcomeBoundCoversTheWorstOutcome(t *testing.T) {
	t.Parallel()
	esc := func(n int) string { return strings.Repeat("<", n) } // written as \u003c
	code, msg := esc(128), esc(1024)                            // as much as the DLF client keeps
	deadline := time.Date(2030, 12, 31, 23, 59, 59, 999999999, time.FixedZone("", -(23*3600+59*60)))
	o := Outcome{
		CommandID:    strings.Repeat("i", 128),
		ProjectID:    strings.Repeat("p", 64),
		Workspace:    strings.Repeat("w", 64),
		ScriptName:   strings.Repeat("\U0001D49C", 128), // a letter, four bytes in UTF-8
		InstanceID:   strings.Repeat("n", 128),
		Reason:       esc(1024),
		Status:       StatusRejected,
		Cause:        CauseRetriesExhausted,
		HTTPStatus:   599,
		ErrorCode:    code,
		ErrorMsg:     msg,
		DLFRequestID: esc(128),
		Attempts:     math.MaxInt,
		ReceivedAt:   FormatTime(deadline),
		FinishedAt:   FormatTime(deadline),
		DurationMS:   math.MaxInt64,
		WorkerID:     strings.Repeat("h", 64) + "-abcdef", // a host name and WorkerID's suffix
	}
	// The longest detail process writes (expiredBeforeCall).
	o.Detail = fmt.Sprintf("deadline %s passed before the next attempt (after %d in earlier deliveries); last: %s",
		deadline.Format(time.RFC3339Nano), math.MaxInt, describe(dlf.Verdict{HTTPStatus: 599, ErrorCode: code, ErrorMsg: msg}))
	b, err := json.Marshal(&o)
	if err != nil {
		t.Fatal(err)
	}
	size := len(b) + len("NATS/1.0\r\n"+jetstream.MsgIDHeader+": \r\n\r\n") + len(o.CommandID)
	t.Logf("worst outcome: %d bytes with its header; bound %d", size, minOutcomeMsgSize)
	if size > minOutcomeMsgSize {
		t.Errorf("worst outcome takes %d bytes, over minOutcomeMsgSize %d", size, minOutcomeMsgSize)
	}
}

// Dead letters are cut to the server's max_payload (fitPayload), so on a
// server that takes less than a dead letter of a 64 KiB command, a dead
// stream limited to max_payload stores every one; below it, not.
func TestDeadStreamLimitFollowsTheServersMaxPayload(t *testing.T) {
	t.Parallel()
	const maxPayload = 48 << 10
	for _, tc := range []struct {
		name  string
		limit int32
		ok    bool
	}{
		{"at max_payload", maxPayload, true},
		{"below max_payload", maxPayload - 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(),
				MaxPayload: maxPayload})
			_, js := testutil.ConnectJS(t, ns.ClientURL())
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_DEAD", Subjects: []string{"dlf.stop.dead"},
				MaxMsgSize: tc.limit}); err != nil {
				t.Fatal(err)
			}
			// Without the bucket: it needs a max_payload of 1 MiB.
			_, err := Setup(ctx, js, Config{DisableState: true}, zaptest.NewLogger(t))
			switch {
			case tc.ok && err != nil:
				t.Fatalf("Setup: %v; want it accepted", err)
			case !tc.ok && (!errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "max_msg_size")):
				t.Fatalf("Setup: %v; want a mismatch naming max_msg_size", err)
			}
		})
	}
}
