package consumer

import (
	"context"
	"testing"
	"time"
)

// A DLF.6205 waits for the answer of a call for the same instance that was
// on the wire with its own, and is explained by it if that call stopped
// the instance; once the stopper's decision is recorded the stop is
// forgotten (the bucket answers then).
func TestSiblingStopExplainsADLF6205(t *testing.T) {
	t.Parallel()
	s := newSiblings(time.Hour)
	a := s.begin("k")
	b := s.begin("k")
	limit := s.end("k", b, "b", false, time.Now()) // b met DLF.6205 while a was on the wire
	type answer struct {
		by string
		ok bool
	}
	got := make(chan answer, 1)
	go func() {
		by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit, time.Minute)
		got <- answer{by, ok}
	}()
	select {
	case r := <-got:
		t.Fatalf("answered %+v before a's call was", r)
	case <-time.After(50 * time.Millisecond):
	}
	s.end("k", a, "a", true, time.Now())
	select {
	case r := <-got:
		if !r.ok || r.by != "a" {
			t.Fatalf("stoppedBy = %+v, want a", r)
		}
	case <-time.After(time.Second):
		t.Fatal("stoppedBy did not return once a was answered")
	}
	// Recorded, the stop is the bucket's to answer (stoppedMeanwhile
	// reads it from the leader): the note goes at once.
	s.forget("k", "a")
	if n := len(s.byKey); n != 0 {
		t.Errorf("%d instances still tracked after the stop was recorded", n)
	}
}

// A sibling that met DLF.6205 too explains nothing, and calls that began
// after this one's answer are not waited for.
func TestSiblingWithoutAStopExplainsNothing(t *testing.T) {
	t.Parallel()
	s := newSiblings(time.Hour)
	a := s.begin("k")
	b := s.begin("k")
	s.end("k", a, "a", false, time.Now())
	limit := s.end("k", b, "b", false, time.Now())
	later := s.begin("k") // on the wire after b's answer: it cannot have caused it
	start := time.Now()
	if by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit, time.Minute); ok {
		t.Errorf("explained by %s", by)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("waited %s for a call that began after the answer", took)
	}
	s.end("k", later, "later", false, time.Now())
}

// A stop by a call that began after this one's answer cannot explain its
// DLF.6205 (the instance may have started meanwhile), even while an older
// call is still awaited.
func TestSiblingStopAfterTheAnswerExplainsNothing(t *testing.T) {
	t.Parallel()
	s := newSiblings(time.Hour)
	slow := s.begin("k")
	b := s.begin("k")
	limit := s.end("k", b, "b", false, time.Now())
	s.end("k", s.begin("k"), "c", true, time.Now()) // began after b's answer
	s.end("k", slow, "slow", false, time.Now())
	if by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit, time.Minute); ok {
		t.Errorf("explained by %s, whose call began after the answer", by)
	}
}

// A stop is not remembered longer than STATE_TTL, which bounds the
// bucket's memory of it too.
func TestSiblingStopLastsNoLongerThanTheStateTTL(t *testing.T) {
	t.Parallel()
	s := newSiblings(10 * time.Millisecond)
	a := s.begin("k")
	b := s.begin("k")
	s.end("k", a, "a", true, time.Now().Add(-time.Second)) // noted a second ago
	limit := s.end("k", b, "b", false, time.Now())
	if by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit, time.Minute); ok {
		t.Errorf("explained by %s, noted longer ago than STATE_TTL", by)
	}
}

// A stop whose command never records its decision, on an instance no call
// names again, is dropped by the sweep once its note runs out: the
// bookkeeping must not grow with every instance ever stopped.
func TestSiblingStopNeverRecordedIsSweptAway(t *testing.T) {
	t.Parallel()
	s := newSiblings(time.Hour)
	now := time.Now()
	s.end("k", s.begin("k"), "a", true, now)
	s.end("other", s.begin("other"), "b", false, now.Add(noteKeep/2))
	if _, ok := s.byKey["k"]; !ok {
		t.Fatal("stop forgotten before its note ran out")
	}
	s.end("other", s.begin("other"), "c", false, now.Add(noteKeep+sweepEvery))
	if n := len(s.byKey); n != 0 {
		t.Errorf("%d instances still tracked after their notes ran out", n)
	}
}
