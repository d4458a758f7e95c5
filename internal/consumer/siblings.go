package consumer

import (
	"context"
	"sync"
	"time"
)

// siblings knows, per instance, the calls of this worker on the wire and
// the stop one of them made until that stop is recorded in the state
// bucket. Commands for one instance whose calls overlap (a scheduler's
// flood, fetched at once) all but one get DLF.6205: the first call
// stopped the instance. The bucket explains that DLF.6205 only once the
// first command's decision is recorded, after its outcome; a DLF.6205
// that comes before then was dead-lettered (up to 15 of 300 in one
// flood). This worker saw the stop itself, so it need not wait for the
// record (see stoppedMeanwhile).
type siblings struct {
	mu    sync.Mutex
	next  uint64 // the ticket the next call gets
	byKey map[string]*instCalls
	ends  int // calls ended since the last sweep
}

type instCalls struct {
	active map[uint64]bool // tickets of the calls on the wire
	// The first call that got a 204, until its command's decision is
	// recorded (forget) or noteKeep has passed.
	stoppedBy, stoppedAt string
	noted                time.Time
}

// noteKeep bounds how long a stop is remembered when its command never
// records its decision (it was returned): the bucket or DLF answer then.
const noteKeep = time.Minute

// siblingWait bounds how long a DLF.6205 waits for the answers of calls
// for the same instance that were on the wire with its own.
const siblingWait = 2 * time.Second

// begin registers a call for instance key and returns its ticket.
func (s *siblings) begin(key string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byKey == nil {
		s.byKey = map[string]*instCalls{}
	}
	ic := s.byKey[key]
	if ic == nil {
		ic = &instCalls{active: map[uint64]bool{}}
		s.byKey[key] = ic
	}
	t := s.next
	s.next++
	ic.active[t] = true
	return t
}

// end registers the answer of the call with ticket t: sid's command
// stopped the instance if stopped. It returns the ticket the next call
// will get: the calls that may have stopped the instance before this one
// reached DLF all have smaller tickets.
func (s *siblings) end(key string, t uint64, sid string, stopped bool, now time.Time) (limit uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ic := s.byKey[key]
	if ic != nil {
		delete(ic.active, t)
		if stopped && ic.stoppedBy == "" {
			ic.stoppedBy, ic.stoppedAt, ic.noted = sid, FormatTime(now), now
		}
		s.drop(key, ic, now)
	}
	if s.ends++; s.ends >= 1024 {
		s.ends = 0
		for k, c := range s.byKey {
			s.drop(k, c, now)
		}
	}
	return s.next
}

// drop removes key's entry once it holds no call and no stop worth
// keeping. Called with s.mu held.
func (s *siblings) drop(key string, ic *instCalls, now time.Time) {
	if ic.stoppedBy != "" && now.Sub(ic.noted) > noteKeep {
		ic.stoppedBy, ic.stoppedAt = "", ""
	}
	if len(ic.active) == 0 && ic.stoppedBy == "" {
		delete(s.byKey, key)
	}
}

// forget drops the stop sid made on instance key: its decision is
// recorded, and the bucket answers from now on.
func (s *siblings) forget(key, sid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ic := s.byKey[key]; ic != nil && ic.stoppedBy == sid {
		ic.stoppedBy, ic.stoppedAt = "", ""
		s.drop(key, ic, time.Now())
	}
}

// stoppedBy waits, at most siblingWait and while ctx lasts, for the calls
// for instance key with tickets below limit to be answered, and returns
// the command of this worker, other than sid, that stopped the instance,
// and when; ok is false when none did.
func (s *siblings) stoppedBy(ctx context.Context, key, sid string, limit uint64) (by, at string, ok bool) {
	deadline := time.Now().Add(siblingWait)
	for {
		s.mu.Lock()
		ic := s.byKey[key]
		if ic == nil {
			s.mu.Unlock()
			return "", "", false
		}
		if ic.stoppedBy != "" && ic.stoppedBy != sid {
			by, at = ic.stoppedBy, ic.stoppedAt
			s.mu.Unlock()
			return by, at, true
		}
		waiting := false
		for t := range ic.active {
			if t < limit {
				waiting = true
				break
			}
		}
		s.mu.Unlock()
		if !waiting || time.Now().After(deadline) {
			return "", "", false
		}
		select {
		case <-ctx.Done():
			return "", "", false
		case <-time.After(5 * time.Millisecond):
		}
	}
}
