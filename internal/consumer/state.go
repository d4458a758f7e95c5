package consumer

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// The state bucket makes "one outcome per command" hold beyond the
// stream's duplicate window, and lets the worker recognise a stop that
// happened although its answer was lost. It is a JetStream key-value
// bucket, so replicas share it without any lock of our own; concurrent
// writers are reconciled with compare-and-set on the key's revision.
//
// A valid command's state lives in its instance's key, so one read per
// command answers every question the decision table asks:
//
//	inst.<instance key>   {"stopped_by": id, "stopped_at": t,
//	                       "cmds": {id: progress or decision}}
//
// "stopped_by" is both "this instance is stopped" (for any other command:
// already_stopped) and the decision of the command that stopped it. A
// rejected command has no instance; its decision goes under
// cmd.<base64url(id)> (ids may hold ':' and "..", which keys may not). The
// same key indexes a valid command's id, as the contract makes a decided id
// final whatever instance a later command with that id names: with the
// "sent" mark below, which names the instance whose document holds the
// decision, or, for a command decided without a call of its own, with its
// decision.
//
// Before its first call a delivery marks the id's key "sent" (delivery n,
// stream sequence, instance key), and waits for JetStream's stored-ack of
// the mark before the request leaves (markSent). A later delivery that
// finds a mark newer than the last progress recorded (by the key's
// revision, see markUnaccounted) knows that a delivery died or lost its
// lease with a call perhaps on the wire, so a
// DLF.6205 means that call's stop (contract section 6); without a mark, a
// DLF.6205 fails as usual. The delivery count alone cannot tell those
// apart: a delivery that died before calling, or never reached the
// worker, counts as well.
//
// The common case, a first delivery that DLF answers 204, costs a share of
// one batched read of both keys (statebatch.go), the mark, and one
// compare-and-set write after the outcome is stored.

// Phases of a command entry.
const (
	phaseAnswered = "answered" // handed back undecided; the fields say how far it got
	phasePending  = "pending"  // decided, but the outcome could not be stored yet
	phaseDecided  = "decided"  // outcome stored; the command is done
	phaseSent     = "sent"     // id index only: delivery d is about to call DLF, or did
)

type cmdEntry struct {
	Phase      string `json:"p"`
	Attempts   int    `json:"a"`
	Unanswered bool   `json:"u,omitempty"` // some call was sent and got no answer
	Delivery   uint64 `json:"d,omitempty"` // the delivery that wrote this entry
	Status     string `json:"s,omitempty"`
	Cause      string `json:"c,omitempty"`
	// Outcome is the decided outcome of a pending entry, stored as it
	// will be published.
	Outcome json.RawMessage `json:"o,omitempty"`
	// OutcomeStored: the pending entry's outcome is already in the
	// outcome stream; only its dead letter (or the decision) is missing.
	OutcomeStored bool `json:"os,omitempty"`
	// OwnStop: a pending entry's outcome is another delivery's (adopted),
	// while the call of the delivery that wrote it stopped the instance;
	// whoever records the decision names the stop too.
	OwnStop bool `json:"ow,omitempty"`
	// At is when the entry was written, in Unix seconds (0: by a version
	// that did not say), so that old entries can be dropped (prune).
	At int64 `json:"t,omitempty"`
	// The last DLF answer of an entry handed back, so that an outcome
	// decided by a later delivery without a call of its own (its deadline
	// passed meanwhile) still reports it (contract section 4).
	LastHTTPStatus int    `json:"lh,omitempty"`
	LastErrorCode  string `json:"le,omitempty"`
	LastErrorMsg   string `json:"lm,omitempty"`
	LastRequestID  string `json:"lr,omitempty"`
	// Seq is the stream sequence of the message a "sent" mark is for (an
	// id reused by another message must not count as its progress), or
	// of the message whose delivery wrote a progress entry (see ownEntry).
	Seq uint64 `json:"q,omitempty"`
	// Inst is the instance key of a "sent" mark's command: its decision
	// and progress live in that instance's document.
	Inst string `json:"i,omitempty"`
	// Held takes a "sent" mark back: its delivery was held back (an
	// opening circuit, a 429 pause) after marking, and sent nothing. The
	// mark still indexes the id; a delivery that dies while held leaves
	// no call to count.
	Held bool `json:"h,omitempty"`
	// MarkRev is the revision of the id's key (its "sent" mark) as the
	// delivery that wrote this progress entry last read or wrote it:
	// Unanswered accounts for every mark up to it, and a mark stored
	// since is of a call this entry knows nothing of (see
	// markUnaccounted). Nil in an entry of a version that did not say.
	MarkRev *uint64 `json:"mr,omitempty"`
}

// maxStoredErrorMsg bounds the error message kept in a command entry: the
// entries of one instance share one document.
const maxStoredErrorMsg = 512

// truncateUTF8 cuts s to at most n bytes without splitting a character.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

type stateDoc struct {
	StoppedBy string `json:"stopped_by,omitempty"`
	StoppedAt string `json:"stopped_at,omitempty"`
	// StoppedT is when the stop was recorded, in Unix seconds by the real
	// clock (0: by a version that did not say), so that the stop is
	// forgotten after STATE_TTL like a command entry: a document written
	// on for other commands would otherwise keep it for ever.
	StoppedT int64                `json:"st,omitempty"`
	Cmds     map[string]*cmdEntry `json:"cmds,omitempty"`
}

// maxCmdEntries bounds the command entries of one instance's document.
// Every command decided for an instance it did not stop leaves an entry
// there (a scheduler that sends the same stop every few seconds leaves
// thousands a day), and each write renews the key's age, so the bucket's
// TTL alone would let the document grow past what a message may hold.
const maxCmdEntries = 256

// prune drops, from an instance's document about to be written at now
// (Unix seconds), the entries older than keep (STATE_TTL) and then, while
// there are more than maxCmdEntries, the oldest decided ones; the entry of
// except, being written, stays. It returns the decided entries dropped for
// room: the id index of a command that called DLF is its "sent" mark,
// which points to this document, so the writer must index those ids as
// decided (indexDropped) once the document is stored.
func (d *stateDoc) prune(now int64, keep time.Duration, except string) (dropped map[string]cmdEntry) {
	d.forgetOldStop(now, keep)
	limit := int64(keep / time.Second)
	for id, e := range d.Cmds {
		if id != except && e.At != 0 && now-e.At > limit {
			delete(d.Cmds, id)
		}
	}
	// Over the budget by bytes, decided entries go too: a pending entry
	// carries its whole outcome, and a document of them can outgrow what
	// a message may hold (found by review), after which no decision for
	// its instance could be recorded. The document is measured only when
	// a bound without encoding it says it might be over: a busy
	// instance's document is written for every command.
	over := 0
	if d.sizeBound() > maxDocBytes {
		if b, err := json.Marshal(d); err == nil && len(b) > maxDocBytes {
			over = len(b) - maxDocBytes
		}
	}
	if len(d.Cmds) <= maxCmdEntries && over == 0 {
		return nil
	}
	var decided []string
	for id, e := range d.Cmds {
		if id != except && e.Phase == phaseDecided {
			decided = append(decided, id)
		}
	}
	slices.SortFunc(decided, func(a, b string) int { return cmp.Compare(d.Cmds[a].At, d.Cmds[b].At) })
	for _, id := range decided {
		if len(d.Cmds) <= maxCmdEntries && over <= 0 {
			break
		}
		if dropped == nil {
			dropped = map[string]cmdEntry{}
		}
		e := d.Cmds[id]
		if over > 0 {
			b, _ := json.Marshal(e)
			over -= len(b) + len(id) + 4 // "id":entry,
		}
		dropped[id] = *e
		delete(d.Cmds, id)
	}
	return dropped
}

// maxDocBytes bounds an instance's document by bytes, below the 1 MiB a
// state bucket's messages may be limited to (minStateMsgSize), with room
// for the entry being written.
const maxDocBytes = 768 << 10

// sizeBound is at least the size of d encoded: every text at six bytes a
// byte (JSON writes <, > and & as \u003c, as it does control characters),
// and room for the names, numbers and punctuation of each entry.
func (d *stateDoc) sizeBound() int {
	const perEntry = 256
	n := perEntry + 6*(len(d.StoppedBy)+len(d.StoppedAt))
	for id, e := range d.Cmds {
		n += perEntry + 6*(len(id)+len(e.Phase)+len(e.Status)+len(e.Cause)+len(e.Outcome)+
			len(e.LastErrorCode)+len(e.LastErrorMsg)+len(e.LastRequestID)+len(e.Inst))
	}
	return n
}

// indexDropped indexes as decided the ids prune dropped for room.
func (s *stateStore) indexDropped(dropped map[string]cmdEntry) {
	for id, e := range dropped {
		s.markDecided(id, cmdEntry{Phase: phaseDecided, Attempts: e.Attempts, Status: e.Status, Cause: e.Cause})
	}
}

// forgetOldStop drops a stop recorded more than keep (STATE_TTL) before
// now (Unix seconds): the contract has the bucket remember a stopped
// instance that long, and no longer.
func (d *stateDoc) forgetOldStop(now int64, keep time.Duration) {
	if d.StoppedT != 0 && now-d.StoppedT > int64(keep/time.Second) {
		d.StoppedBy, d.StoppedAt, d.StoppedT = "", "", 0
	}
}

// stateRecord is a document as read, with the revision to update it at.
type stateRecord struct {
	key string
	rev uint64 // 0: the key does not exist
	doc stateDoc
}

// dropNull removes command entries written as null (by hand, or by
// another program): every reader of an entry takes it to be there.
func (d *stateDoc) dropNull() {
	for id, e := range d.Cmds {
		if e == nil {
			delete(d.Cmds, id)
		}
	}
}

type stateStore struct {
	kv     jetstream.KeyValue
	reader *batchReader // nil: lookups go one by one
	leader *leaderReader
	writer *stateWriter // nil: saveAsync falls back to save

	// The decision records waiting for a write of their document to
	// answer, by key; a key is present while such a write is under way
	// (see saveAsync).
	queueMu sync.Mutex
	queued  map[string][]*queuedSave
}

func cmdKey(id string) string {
	b := make([]byte, 0, len("cmd.")+base64.RawURLEncoding.EncodedLen(len(id)))
	return string(base64.RawURLEncoding.AppendEncode(append(b, "cmd."...), []byte(id)))
}

func instKey(k string) string { return "inst." + k }

// ensureState binds the bucket, creating it when missing. An existing
// bucket is used as it is (an operator may have tuned its TTL).
func ensureState(ctx context.Context, js jetstream.JetStream, cfg *Config, log *zap.Logger) (*stateStore, error) {
	// A server that takes smaller messages than a document may grow to
	// refuses some commands' records for good, as a bucket limited so
	// would (below); it says so at start.
	if mp := js.Conn().MaxPayload(); mp > 0 && mp < minStateMsgSize {
		return nil, fmt.Errorf("%w: the NATS server takes messages of at most %d bytes (max_payload); the state bucket %s needs at least %d",
			ErrMismatch, mp, cfg.StateBucket, minStateMsgSize)
	}
	kv, err := js.KeyValue(ctx, cfg.StateBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      cfg.StateBucket,
			Description: "dlf-stop worker: per-command state and stopped instances",
			History:     1,
			TTL:         cfg.StateTTL,
			Storage:     jetstream.FileStorage,
			Replicas:    cfg.Replicas,
		})
		if err == nil {
			log.Info("created state bucket", zap.String("bucket", cfg.StateBucket), zap.Duration("ttl", cfg.StateTTL))
		} else if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			kv, err = js.KeyValue(ctx, cfg.StateBucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("bind state bucket %s: %w", cfg.StateBucket, err)
	}
	// Lookups are batched direct gets (statebatch.go), which a bucket
	// made without direct access refuses: every command would then be
	// returned for ever. Say so at start instead.
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("state bucket %s: %w", cfg.StateBucket, err)
	}
	if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok && bs.StreamInfo() != nil {
		sc := bs.StreamInfo().Config
		if err := checkBucketFit(sc, cfg, log); err != nil {
			return nil, err
		}
		if !sc.AllowDirect {
			return nil, fmt.Errorf("%w: state bucket %s does not allow direct gets (allow_direct), which the worker reads it with",
				ErrMismatch, cfg.StateBucket)
		}
		// A limit below what a mark or a document can take refuses
		// some commands' records for good, and such a command would
		// wait for its call for ever (see callUnmarked).
		if sc.MaxMsgSize > 0 && sc.MaxMsgSize < minStateMsgSize {
			return nil, fmt.Errorf("%w: state bucket %s limits its messages to %d bytes (max_msg_size); the worker needs at least %d",
				ErrMismatch, cfg.StateBucket, sc.MaxMsgSize, minStateMsgSize)
		}
	}
	return &stateStore{kv: kv}, nil
}

// lookupThen reads the documents of keys, batched with other commands'
// lookups. then runs on the reader's goroutine and must not block.
func (s *stateStore) lookupThen(keys []string, then func([]*stateRecord, error)) {
	if s.reader != nil {
		s.reader.lookupThen(keys, then)
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
		defer cancel()
		recs := make([]*stateRecord, len(keys))
		for i, key := range keys {
			r, err := s.load(ctx, key)
			if err != nil {
				then(nil, err)
				return
			}
			recs[i] = r
		}
		then(recs, nil)
	}()
}

// lookupWait is lookupThen for a caller that can wait.
func (s *stateStore) lookupWait(ctx context.Context, keys []string) ([]*stateRecord, error) {
	type result struct {
		recs []*stateRecord
		err  error
	}
	res := make(chan result, 1)
	s.lookupThen(keys, func(recs []*stateRecord, err error) { res <- result{recs, err} })
	select {
	case r := <-res:
		return r.recs, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// lookupLeader reads keys from the bucket's leader (see leaderReader). A
// stream without a leader (an election, a lost quorum) answers no such
// read, so after leaderReadTimeout, or an error, it reads as lookupWait
// does: a follower's answer, perhaps a moment behind, is better than none.
// So it does when the worker has no leader reader (tests of the state
// alone).
func (s *stateStore) lookupLeader(ctx context.Context, keys []string) ([]*stateRecord, error) {
	if s.leader != nil {
		lctx, cancel := context.WithTimeout(ctx, leaderReadTimeout)
		recs, err := s.leader.read(lctx, keys)
		cancel()
		if err == nil || ctx.Err() != nil {
			return recs, err
		}
	}
	return s.lookupWait(ctx, keys)
}

// leaderReadTimeout bounds a read from the leader before lookupLeader
// falls back to a direct get; an election usually takes a few seconds.
const leaderReadTimeout = 2 * time.Second

// load reads one document; a missing key is an empty document.
func (s *stateStore) load(ctx context.Context, key string) (*stateRecord, error) {
	r := &stateRecord{key: key}
	e, err := s.kv.Get(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return r, nil
	case err != nil:
		return nil, fmt.Errorf("read state %s: %w", key, err)
	}
	r.rev = e.Revision()
	// An unreadable document is treated as empty: it must never block a
	// command, and the next write replaces it.
	_ = json.Unmarshal(e.Value(), &r.doc)
	r.doc.dropNull()
	return r, nil
}

// minStateMsgSize is the smallest message size limit a state bucket (and
// the server's max_payload) may have: NATS's default max_payload. An
// instance's document holds up to maxCmdEntries command entries, within
// maxDocBytes while decided entries can make room.
const minStateMsgSize = 1 << 20

// maxCASRetries bounds the re-read-and-merge loop when another writer
// wrote the same key meanwhile (commands for one instance handed back at
// once, or decided by several workers); the caller's context bounds it
// in time.
const maxCASRetries = 64

// casBackoff spaces the re-reads of save: writers that lost to each other
// and retried at once met again, and a count of tries ran out while the
// key was merely busy (found by review: 9 of 24 concurrent writers of one
// key failed after eight tries each). Jitter spreads them out.
func casBackoff() *backoff.ExponentialBackOff {
	return &backoff.ExponentialBackOff{
		InitialInterval:     2 * time.Millisecond,
		RandomizationFactor: 0.5,
		Multiplier:          2,
		MaxInterval:         100 * time.Millisecond,
		Stop:                backoff.Stop,
		Clock:               backoff.SystemClock,
	}
}

// save applies change to the document and stores it with compare-and-set,
// re-reading and re-applying when the key moved under us.
func (s *stateStore) save(ctx context.Context, r *stateRecord, change func(*stateDoc)) error {
	var bo *backoff.ExponentialBackOff // made on the first conflict only
	for i := 0; ; i++ {
		change(&r.doc)
		b, err := stateDocJSON(&r.doc)
		if err != nil {
			return err
		}
		var rev uint64
		if r.rev == 0 {
			rev, err = s.kv.Create(ctx, r.key, b)
		} else {
			rev, err = s.kv.Update(ctx, r.key, b, r.rev)
		}
		if err == nil {
			r.rev = rev
			return nil
		}
		// Only a lost compare-and-set is worth another try here: a
		// refusal of another kind (a message over the bucket's limit)
		// would be refused again, and retried for the whole deadline it
		// held the command from being handed back (found by review, with
		// the pause below). A bucket without a leader for a moment is
		// tried again by nats.go itself; a longer election fails the
		// write, and every caller copes with a failed write.
		conflict := errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
		if !conflict || ctx.Err() != nil || i >= maxCASRetries {
			return fmt.Errorf("write state %s: %w", r.key, err)
		}
		if bo == nil {
			bo = casBackoff()
			bo.Reset()
		}
		t := time.NewTimer(bo.NextBackOff())
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("write state %s: %w", r.key, err)
		case <-t.C:
		}
		fresh, lerr := s.load(ctx, r.key)
		if lerr != nil {
			return lerr
		}
		*r = *fresh
	}
}

// markDecided records, under the command id's own key, that a valid
// command is decided. Its decision lives in its instance's document; this
// index is what recognises the same id published again for another
// instance, or this command read under other defaults. A command that
// called DLF needs none: its "sent" mark is the index, pointing to the
// document that holds the decision. It is written without waiting for the
// stored-ack (see stateWriter.put): it only serves those rare cases.
func (s *stateStore) markDecided(id string, e cmdEntry) {
	if s.writer == nil {
		return
	}
	s.writer.put(cmdKey(id), decidedIndexDoc(id, e))
}

// markSentAt records that delivery n of the command sid (stream sequence
// seq) is about to call DLF, and returns once JetStream has stored the
// record, so that no call leaves without it (see the package comment).
//
// The mark replaces what the id's key held at rev, as this delivery read
// it (or last wrote it), and fails with errWrongRevision when the key
// moved since. Written unconditionally, a mark erased the evidence it
// exists for: a redelivery whose read was answered by a follower not yet
// caught up with an earlier delivery's mark (after a restart a replica
// answers direct gets once 90% synchronised) overwrote that mark with its
// own, and its DLF.6205 then had nothing to explain it and was
// dead-lettered although the earlier call had stopped the instance.
func (s *stateStore) markSentAt(ctx context.Context, sid string, n, seq uint64, inst string, rev uint64) (uint64, error) {
	return s.markSentKey(ctx, cmdKey(sid), sid, n, seq, inst, rev)
}

// markSentKey is markSentAt for a caller that has the id's key, cmdKey(sid),
// at hand.
func (s *stateStore) markSentKey(ctx context.Context, key, sid string, n, seq uint64, inst string, rev uint64) (uint64, error) {
	return s.putMark(ctx, key, sentMarkDoc(sid, n, seq, inst), rev)
}

// putMark stores a "sent" mark under key, an id's key, over revision rev
// (see markSentAt), returning once JetStream has stored it, with its
// revision.
func (s *stateStore) putMark(ctx context.Context, key string, doc []byte, rev uint64) (uint64, error) {
	if s.writer == nil {
		var err error
		if rev == 0 {
			rev, err = s.kv.Create(ctx, key, doc)
		} else {
			rev, err = s.kv.Update(ctx, key, doc, rev)
		}
		if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			err = fmt.Errorf("write state %s: %w", key, errWrongRevision)
		}
		return rev, err
	}
	return s.writer.putAcked(ctx, key, doc, rev)
}

// retractMark takes back delivery n's "sent" mark when the delivery is held
// back before its call, by putting the mark again, marked held, over the
// mark's revision rev.
func (s *stateStore) retractMark(ctx context.Context, sid string, n, seq uint64, inst string, rev uint64) (uint64, error) {
	doc, err := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{sid: {Phase: phaseSent, Delivery: n, Seq: seq, Inst: inst, Held: true}}})
	if err != nil {
		return 0, err
	}
	return s.putMark(ctx, cmdKey(sid), doc, rev)
}

// put overwrites a command entry unconditionally; for tests that set up
// what an earlier delivery left behind.
func (s *stateStore) putEntry(ctx context.Context, key, id string, e cmdEntry) error {
	r, err := s.load(ctx, key)
	if err != nil {
		return err
	}
	return s.save(ctx, r, func(d *stateDoc) {
		if d.Cmds == nil {
			d.Cmds = map[string]*cmdEntry{}
		}
		d.Cmds[id] = &e
	})
}
