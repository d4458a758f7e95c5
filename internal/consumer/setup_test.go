package consumer

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestSubjectMatches(t *testing.T) {
	for _, tc := range []struct {
		pattern, subject string
		want             bool
	}{
		{"dlf.stop.request", "dlf.stop.request", true},
		{"dlf.stop.*", "dlf.stop.request", true},
		{"dlf.>", "dlf.stop.request", true},
		{">", "dlf", true},
		{"dlf.stop", "dlf.stop.request", false},
		{"dlf.stop.request.x", "dlf.stop.request", false},
		{"dlf.*.x", "dlf.stop.request", false},
		{"dlf.stop.outcome.*", "dlf.stop.outcome.stopped", true},
	} {
		if got := subjectMatches(tc.pattern, tc.subject); got != tc.want {
			t.Errorf("subjectMatches(%q, %q) = %v", tc.pattern, tc.subject, got)
		}
	}
}

// Existing resources are used as they are; ones that cannot work stop the
// worker at start with an error naming the mismatch.
func TestSetupChecksExistingResources(t *testing.T) {
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A tuned existing stream is not overwritten.
	s, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_OUTCOMES",
		Subjects: []string{"dlf.stop.outcome.*"}, MaxAge: time.Hour, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	_ = s
	if _, err := Setup(ctx, e.js, e.cfg, e.log); err != nil {
		t.Fatalf("setup on existing resources: %v", err)
	}
	info, err := e.js.Stream(ctx, "DLF_STOP_OUTCOMES")
	if err != nil {
		t.Fatal(err)
	}
	if info.CachedInfo().Config.MaxAge != time.Hour {
		t.Error("setup overwrote the operator's MaxAge")
	}

	// Wrong subjects.
	if _, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_DEAD",
		Subjects: []string{"somewhere.else"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	_, err = Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "DLF_STOP_DEAD") || !strings.Contains(err.Error(), "dlf.stop.dead") {
		t.Fatalf("wrong subjects: %v", err)
	}
	if _, err := e.js.UpdateStream(ctx, jetstream.StreamConfig{Name: "DLF_STOP_DEAD",
		Subjects: []string{"dlf.stop.dead"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}

	// A push consumer under the worker's name.
	if err := e.js.DeleteConsumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.js.CreateOrUpdatePushConsumer(ctx, "DLF_STOP", jetstream.ConsumerConfig{
		Durable: "dlf-stop-worker", DeliverSubject: "push.here", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	_, err = Setup(ctx, e.js, e.cfg, e.log)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "push consumer") {
		t.Fatalf("push consumer: %v", err)
	}
}
