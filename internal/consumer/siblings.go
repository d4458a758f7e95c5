package consumer

import (
	"context"
	"slices"
	"sync"
	"time"
)

// siblings knows, per instance, the calls of this worker on the wire and
// the stop one of them made until that stop is recorded in the state
// bucket. Commands for one instance whose calls overlap (a scheduler's
// flood, fetched at once) all but one get DLF.6205: the first call
// stopped the instance. The bucket explains that DLF.6205 only once the
// first command's decision is recorded, after its outcome; a DLF.6205
// that came before then was dead-lettered (0 to 18 of 300 in a flood).
// This worker saw the stop itself, so it need not wait for the record
// (see stoppedMeanwhile).
type siblings struct {
	mu    sync.Mutex
	keep  time.Duration // how long a stop is remembered unrecorded: min(noteKeep, STATE_TTL)
	next  uint64        // the ticket the next call gets
	byKey map[string]*instCalls
	// The last time every entry was looked at for dropping: a stop whose
	// command never records it (returned undecided) is noted until its
	// time is up, and no other call may come for that instance.
	swept time.Time
}

// sweepEvery is how often entries whose notes ran out are dropped.
const sweepEvery = time.Second

type instCalls struct {
	// Tickets of the calls on the wire: nearly always one, so a slice,
	// not a map, starting in first.
	active []uint64
	first  [1]uint64
	// The first call that got a 204 (its ticket, command and time), until
	// its command's decision is recorded (forget), or at most keep after
	// the stop.
	stopTicket uint64
	stoppedBy  string
	stoppedAt  time.Time // formatted only when a DLF.6205 asks: most stops are never asked about
	until      time.Time
}

// noteKeep bounds how long a stop is remembered when its command never
// records its decision (it was returned): the bucket or DLF answer then.
const noteKeep = time.Minute

func newSiblings(stateTTL time.Duration) siblings {
	return siblings{keep: min(noteKeep, stateTTL)}
}

// begin registers a call for instance key and returns its ticket.
func (s *siblings) begin(key string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byKey == nil {
		s.byKey = map[string]*instCalls{}
	}
	ic := s.byKey[key]
	if ic == nil {
		ic = &instCalls{}
		ic.active = ic.first[:0]
		s.byKey[key] = ic
	}
	t := s.next
	s.next++
	ic.active = append(ic.active, t)
	return t
}

// end registers the answer of the call with ticket t: sid's command
// stopped the instance if stopped. It returns the ticket the next call
// will get: the calls that may have stopped the instance before this one
// reached DLF all have smaller tickets.
func (s *siblings) end(key string, t uint64, sid string, stopped bool, now time.Time) (limit uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ic := s.byKey[key]; ic != nil {
		if i := slices.Index(ic.active, t); i >= 0 {
			ic.active = slices.Delete(ic.active, i, i+1)
		}
		if stopped && (ic.stoppedBy == "" || now.After(ic.until)) {
			ic.stopTicket, ic.stoppedBy, ic.stoppedAt, ic.until = t, sid, now, now.Add(s.keep)
		}
		s.drop(key, ic, now)
	}
	if now.Sub(s.swept) >= sweepEvery {
		s.swept = now
		for k, c := range s.byKey {
			s.drop(k, c, now)
		}
	}
	return s.next
}

// drop removes key's entry once it holds no call and no stop worth
// keeping. Called with s.mu held.
func (s *siblings) drop(key string, ic *instCalls, now time.Time) {
	if ic.stoppedBy != "" && now.After(ic.until) {
		ic.stoppedBy = ""
	}
	if len(ic.active) == 0 && ic.stoppedBy == "" {
		delete(s.byKey, key)
	}
}

// forget drops the note of the stop sid made on instance key: its
// decision is recorded, and the bucket's leader answers for it
// (stoppedMeanwhile reads it there). Kept longer, the notes of a steady
// flow of stops made this map hold tens of thousands of instances, and
// every call paid for its size.
func (s *siblings) forget(key, sid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ic := s.byKey[key]; ic != nil && ic.stoppedBy == sid {
		ic.stoppedBy = ""
		s.drop(key, ic, time.Now())
	}
}

// stoppedBy waits, while ctx lasts and at most wait, for the calls for
// instance key with tickets below limit to be answered, and returns the
// command of this worker, other than sid, whose call among them stopped
// the instance, and when; ok is false when none did. A call with a ticket
// from limit on began after this one's answer, and cannot explain it.
func (s *siblings) stoppedBy(ctx context.Context, key, sid string, limit uint64, wait time.Duration) (by, at string, ok bool) {
	deadline := time.Now().Add(wait)
	for {
		now := time.Now()
		s.mu.Lock()
		ic := s.byKey[key]
		if ic == nil {
			s.mu.Unlock()
			return "", "", false
		}
		if ic.stoppedBy != "" && ic.stoppedBy != sid && ic.stopTicket < limit && !now.After(ic.until) {
			by, at = ic.stoppedBy, FormatTime(ic.stoppedAt)
			s.mu.Unlock()
			return by, at, true
		}
		waiting := slices.ContainsFunc(ic.active, func(t uint64) bool { return t < limit })
		s.mu.Unlock()
		if !waiting || now.After(deadline) {
			return "", "", false
		}
		select {
		case <-ctx.Done():
			return "", "", false
		case <-time.After(5 * time.Millisecond):
		}
	}
}
