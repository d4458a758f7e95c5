package consumer

import (
	"context"
	"errors"
	"fmt"
)

// recordSave is a decision record's part in a write (see saveAsync):
// change applies the record to a document; stored runs on the answer's
// goroutine and must not block; failed runs on a goroutine of its own.
type recordSave interface {
	change(*stateDoc)
	stored()
	failed(error)
}

// queuedSave is one decision record waiting to be written (see saveAsync).
type queuedSave struct {
	ctx context.Context
	r   *stateRecord
	s   recordSave
	// applied: r holds change, as a caller's retry and a hand-back at
	// stop go on from r (see groupFailed).
	applied bool
	// alone is a group of this record only, the usual one: a slice of
	// it costs no allocation of its own.
	alone [1]*queuedSave
}

// saveAsync is save without a goroutine waiting for the answer (see
// statewrite.go). rs.stored runs on the answer's goroutine and must not
// block; rs.failed runs on a goroutine of its own. A compare-and-set refusal goes
// through save's re-read-and-merge loop, bounded by ctx and the publish
// timeout, starting with the re-read: the revision the refused write
// named is known to be stale.
//
// One write per document is under way at a time. Records for a document
// whose write is under way wait, and go together in one write on top of
// what that write stored once it answers. Written each on its own, they
// would all name the revision they read: a flood of commands for one
// instance (a scheduler that kept sending the same stop while no worker
// ran) is fetched at once, and all but one of its records would lose
// compare-and-set each round, their commands held through growing retries
// (300 commands took 18 s and 1,250 retries to drain). Records written by
// another worker still meet compare-and-set, and are merged by re-reading.
func (s *stateStore) saveAsync(ctx context.Context, r *stateRecord, rs recordSave) {
	q := &queuedSave{ctx: ctx, r: r, s: rs}
	q.alone[0] = q
	if s.writer == nil {
		go s.saveGroup(r.key, q.alone[:], r)
		return
	}
	s.queueMu.Lock()
	if waiting, busy := s.queued[r.key]; busy {
		s.queued[r.key] = append(waiting, q)
		s.queueMu.Unlock()
		return
	}
	if s.queued == nil {
		s.queued = map[string][]*queuedSave{}
	}
	s.queued[r.key] = nil
	s.queueMu.Unlock()
	// The first record is applied to the document as its command read it,
	// which is what that command's retries go on from.
	s.writeGroup(r.key, q.alone[:], r)
}

// writeGroup applies every change of group to base and writes the result
// if the key is still at base's revision.
func (s *stateStore) writeGroup(key string, group []*queuedSave, base *stateRecord) {
	b, err := applyGroup(group, base)
	if err != nil {
		s.groupFailed(key, group, err)
		return
	}
	s.writer.write(key, b, base.rev, publishTimeout, func(rev uint64, err error) {
		switch {
		case err == nil:
			base.rev = rev
			s.stored(key, group, base)
		case errors.Is(err, errWrongRevision):
			go s.saveGroup(key, group, nil)
		default:
			s.groupFailed(key, group, err)
		}
	})
}

// applyGroup applies group's changes to base and encodes the result. A
// panic in them becomes an error: the key must not stay busy for good,
// and a queued group is applied on the answer's goroutine, where nothing
// else would recover it.
func applyGroup(group []*queuedSave, base *stateRecord) (b []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("write state %s: panic applying the decision: %v", base.key, r)
		}
	}()
	for _, q := range group {
		q.s.change(&base.doc)
		if q.r == base {
			q.applied = true
		}
	}
	return stateDocJSON(&base.doc)
}

// saveGroup writes group's changes through save's re-read-and-merge loop,
// reading the document first when base is nil, and then lets the records
// that queued meanwhile go.
func (s *stateStore) saveGroup(key string, group []*queuedSave, base *stateRecord) {
	ctx, cancel := context.WithTimeout(group[0].ctx, publishTimeout)
	defer cancel()
	if base == nil {
		fresh, err := s.load(ctx, key)
		if err != nil {
			s.groupFailed(key, group, err)
			return
		}
		base = fresh
	}
	err := func() (err error) {
		defer func() { // as in applyGroup
			if r := recover(); r != nil {
				err = fmt.Errorf("write state %s: panic applying the decision: %v", key, r)
			}
		}()
		return s.save(ctx, base, func(d *stateDoc) {
			for _, q := range group {
				q.s.change(d)
			}
		})
	}()
	if err != nil {
		s.groupFailed(key, group, err)
		return
	}
	s.stored(key, group, base)
}

// stored ends group, written as written. A record written alone holds
// what was stored, as a caller goes on from it; the records of a group
// that queued are not read again once ok runs, and copying the document
// into each would cost the answer's goroutine most in a flood. The records
// that queued meanwhile are written on top of it.
func (s *stateStore) stored(key string, group []*queuedSave, written *stateRecord) {
	if q := group[0]; len(group) == 1 && q.r != written {
		*q.r = stateRecord{key: key, rev: written.rev, doc: written.doc.clone()}
	}
	if s.writer != nil {
		s.writeNext(key, written)
	}
	for _, q := range group {
		q.s.stored()
	}
}

// groupFailed reports err to every record of group, each on a goroutine
// of its own, and lets the records that queued meanwhile go; they read the
// document afresh, as nothing is known of what it holds now. A record that
// does not hold its change yet gets it first: the caller retries from it,
// and a stop hands the document back as it is in memory, decision and all.
func (s *stateStore) groupFailed(key string, group []*queuedSave, err error) {
	for _, q := range group {
		if !q.applied {
			func() {
				defer func() { _ = recover() }() // it panicked once already
				q.s.change(&q.r.doc)
			}()
		}
		go q.s.failed(err)
	}
	if s.writer != nil {
		s.writeNext(key, nil)
	}
}

// writeNext writes the records that queued for key while its last write
// was under way, all at once, on top of what that write stored (written;
// nil: it failed, so read first); with none queued, key is free again.
func (s *stateStore) writeNext(key string, written *stateRecord) {
	s.queueMu.Lock()
	group := s.queued[key]
	if len(group) == 0 {
		delete(s.queued, key)
		s.queueMu.Unlock()
		return
	}
	s.queued[key] = nil
	s.queueMu.Unlock()
	if written == nil {
		go s.saveGroup(key, group, nil)
		return
	}
	s.writeGroup(key, group, &stateRecord{key: key, rev: written.rev, doc: written.doc.clone()})
}

// clone copies a document deeply enough that changing the copy's entries
// leaves the original alone.
func (d stateDoc) clone() stateDoc {
	c := d
	if d.Cmds != nil {
		c.Cmds = make(map[string]*cmdEntry, len(d.Cmds))
		for id, e := range d.Cmds {
			ec := *e
			c.Cmds[id] = &ec
		}
	}
	return c
}
