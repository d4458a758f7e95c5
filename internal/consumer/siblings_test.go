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
	var s siblings
	a := s.begin("k")
	b := s.begin("k")
	limit := s.end("k", b, "b", false, time.Now()) // b met DLF.6205 while a was on the wire
	type answer struct {
		by string
		ok bool
	}
	got := make(chan answer, 1)
	go func() {
		by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit)
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
	s.forget("k", "a")
	if by, _, ok := s.stoppedBy(context.Background(), "k", "c", s.next); ok {
		t.Errorf("a's stop still explains after it was recorded: %s", by)
	}
	if n := len(s.byKey); n != 0 {
		t.Errorf("%d instances still tracked with nothing on the wire", n)
	}
}

// A sibling that met DLF.6205 too explains nothing, and calls that began
// after this one's answer are not waited for.
func TestSiblingWithoutAStopExplainsNothing(t *testing.T) {
	var s siblings
	a := s.begin("k")
	b := s.begin("k")
	s.end("k", a, "a", false, time.Now())
	limit := s.end("k", b, "b", false, time.Now())
	later := s.begin("k") // on the wire after b's answer: it cannot have caused it
	start := time.Now()
	if by, _, ok := s.stoppedBy(context.Background(), "k", "b", limit); ok {
		t.Errorf("explained by %s", by)
	}
	if took := time.Since(start); took > siblingWait/2 {
		t.Errorf("waited %s for a call that began after the answer", took)
	}
	s.end("k", later, "later", false, time.Now())
}
