package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf"
)

// publishTimeout bounds the wait for one stored-ack. A publish that takes
// longer is treated as failed and the command is returned, never acked.
const publishTimeout = 5 * time.Second

// job is one delivery of one command on its way to an outcome.
type job struct {
	msg  jetstream.Msg
	hb   *heartbeat // the message's, stopped before it is returned
	meta *jetstream.MsgMetadata
	cmd  command.Command
	// sid is the command's identity in the state bucket: its id, and for
	// an id made of the stream sequence also the time the stream stored
	// it (see stateID).
	sid      string
	inst     string    // the command's instance key (see command.InstanceKey); "" when invalid
	received time.Time // when this delivery reached the worker
	verr     error     // why the command is invalid; nil when valid
	valid    bool
	out      Outcome
	attempts int // DLF calls for this command, across deliveries when the state bucket is on
	// unanswered: some call for this command was sent and got no answer
	// (this delivery, or an earlier one per the state bucket), so a later
	// DLF.6205 means the stop happened.
	unanswered bool
	// markCounted: the last call known, an earlier delivery's, is one
	// whose delivery died after its "sent" mark (see recall); it went
	// unanswered. answeredBefore: an earlier delivery recorded calls it
	// made and handed the command back.
	markCounted, answeredBefore bool
	marked                      bool // this delivery's "sent" mark is stored (see markSentAt)
	// markRev is the revision of the id's key as this delivery read it,
	// or as its last mark wrote it: a mark replaces only that.
	markRev uint64
	called  bool // this delivery has sent a call: its mark must stand
	// sibLimit bounds the calls of this worker for the same instance that
	// were on the wire with this delivery's last call; noted: a call of
	// this delivery stopped the instance, as siblings records (see
	// siblings.go).
	sibLimit uint64
	noted    bool
	// stopRecorded: the decision record as stored names this command
	// as the instance's stopper (set by the record's change, read once
	// it is stored), so the bucket explains a sibling's DLF.6205.
	stopRecorded bool
	// ownStop: this delivery's call stopped the instance, though the
	// outcome stored for the command is another delivery's (adopted in
	// decidedMeanwhile): the record names the stop all the same.
	ownStop bool
	decided bool // j.out holds a decision not yet stored
	// outcomeStored: j.out is in the outcome stream (only the dead
	// letter or the decision record is missing), by this delivery or an
	// earlier one per the state bucket; it must not be published again.
	outcomeStored bool
	state         *stateRecord // as read by recall; nil without the state bucket
	keys          [2]string    // stateKeys, once built
	nkeys         int
	log           *zap.Logger
	// release lets go of the message (see handle); handedOff says the
	// state writer will call it once the decision is recorded.
	release   func()
	handedOff bool
}

// stateKeys are where the command's state lives (see state.go): first its
// document, then, for a valid command, the index of its id.
func (j *job) stateKeys() []string {
	// Built once, on the first call, which handle makes before the job
	// goes to another goroutine: the common path reads them twice.
	if j.nkeys == 0 {
		if j.valid {
			j.keys, j.nkeys = [2]string{instKey(j.inst), cmdKey(j.sid)}, 2
		} else {
			j.keys, j.nkeys = [2]string{cmdKey(j.sid)}, 1
		}
	}
	return j.keys[:j.nkeys:j.nkeys]
}

// idKey is the key of the command's id, cmdKey(j.sid).
func (j *job) idKey() string {
	keys := j.stateKeys()
	return keys[len(keys)-1]
}

// stateID is the identity under which the state bucket knows a command.
// An id the publisher chose names one command for ever (contract section
// 6). An id made of the stream sequence ("DLF_STOP-12") names a place in
// the stream, and a stream deleted and created again hands the same place
// to another command: were the id alone the identity, that command would
// be taken for a decided one and acked without a stop or an outcome. The
// time the stream stored the message tells them apart; every delivery of
// one message carries the same time. '@' cannot occur in an id.
func stateID(c command.Command, stored time.Time) string {
	if !c.SeqID {
		return c.ID
	}
	return c.ID + "@" + strconv.FormatInt(stored.UnixNano(), 10)
}

// shownID is the command id within a state identity, for messages.
func shownID(sid string) string {
	id, _, _ := strings.Cut(sid, "@")
	return id
}

// prepare reads what a delivery says: its metadata and its command. It
// returns nil when the message cannot be handled at all; it has then been
// returned to JetStream, unless prepare panicked: the panic is logged and
// the caller hands the message to afterPanic.
func (w *Worker) prepare(msg jetstream.Msg) (j *job, panicked bool) {
	defer func() {
		if r := recover(); r != nil {
			w.logPanic(r)
			j, panicked = nil, true
		}
	}()
	meta, err := msg.Metadata()
	if err != nil {
		// Not a JetStream delivery: cannot happen on a pull consumer, and
		// without metadata nothing can be decided safely. Return it.
		w.log.Error("message without JetStream metadata; returning it", zap.Error(err))
		_ = msg.NakWithDelay(w.cfg.RetryInitial)
		w.m.returned.WithLabelValues("no_metadata").Inc()
		return nil, false
	}
	if why := w.bodyWithheld(msg, meta.Sequence.Stream); why != bodyKept {
		if why == bodyHeadersOff {
			w.log.Error("a command arrived without its body (a headers-only consumer); returning it",
				zap.Uint64("stream_seq", meta.Sequence.Stream))
		}
		_ = msg.NakWithDelay(w.cfg.RetryMax)
		w.m.returned.WithLabelValues(why).Inc()
		return nil, false
	}
	hdr := msg.Headers()
	_, redrive := hdr[HeaderRedriveOf]
	cmd, verr := command.Decode(msg.Data(), command.Meta{
		MsgID:   hdr.Get(nats.MsgIdHdr),
		Redrive: redrive,
		Stream:  meta.Stream,
		Seq:     meta.Sequence.Stream,
	}, w.cfg.Defaults)
	j = &job{msg: msg, meta: meta, cmd: cmd, sid: stateID(cmd, meta.Timestamp), received: time.Now(),
		verr: verr, valid: verr == nil}
	if j.valid { // read on every step of the common path: built once
		j.inst = cmd.InstanceKey()
	}
	j.out = Outcome{
		CommandID:  cmd.ID,
		ProjectID:  cmd.ProjectID,
		Workspace:  cmd.Workspace,
		ScriptName: cmd.ScriptName,
		InstanceID: cmd.InstanceID,
		Reason:     cmd.Reason,
		ReceivedAt: FormatTime(meta.Timestamp),
		WorkerID:   w.cfg.WorkerID,
	}
	j.log = w.log.With(zap.String("command_id", cmd.ID), zap.String("project_id", cmd.ProjectID),
		zap.String("script_name", cmd.ScriptName), zap.String("instance_id", cmd.InstanceID),
		zap.Uint64("delivery", meta.NumDelivered))
	return j, false
}

// process takes one prepared delivery to a decision (outcome stored, then
// ack) or hands it back to JetStream (nak) when it cannot decide now. recs
// and lerr are the state bucket's answer for the command's stateKeys
// (unused without the bucket).
func (w *Worker) process(j *job, recs []*stateRecord, lerr error) {
	if w.state != nil {
		if lerr != nil {
			recs, lerr = w.readAgain(j, lerr)
		}
		if !w.recall(j, recs, lerr) {
			return
		}
	}
	cmd, meta, verr := j.cmd, j.meta, j.verr
	if verr != nil {
		w.finish(j, StatusRejected, CauseInvalidCommand, verr.Error())
		return
	}
	if cmd.HasDeadline && !w.now().Before(cmd.Deadline) {
		w.finish(j, StatusExpired, CauseDeadlinePassed, expiredBeforeCall(j))
		return
	}

	req := dlf.StopRequest{ProjectID: cmd.ProjectID, Workspace: cmd.Workspace,
		ScriptName: cmd.ScriptName, InstanceID: cmd.InstanceID}
	sched := newSchedule(&w.cfg, meta.Timestamp, max(int(meta.NumDelivered)-1, j.attempts))
	// The circuit and a 429's pause give way at the give-up time, so that
	// a command ends within DLF_TIMEOUT of it as the contract says. That
	// holds for a delivery that begins just after the give-up time of a
	// command an earlier delivery recorded calls for and handed back (not
	// a mark of a delivery that died): its last wait, shortened to end there,
	// was handed back to JetStream for being long (waitInProcess), and
	// comes back a pull later (found by review: a 429's long Retry-After
	// then held the last attempt for all of it). Any other delivery that
	// begins after the give-up time cannot meet the bound anyway, whether
	// the command is new to the worker or came back (fetched as the
	// circuit opened, or its worker died): its one call waits its turn
	// like any other, a probe while the circuit is open, so that a backlog
	// that aged during an outage is neither sent to DLF all at once nor
	// dead-lettered one fetch after another while DLF is known to fail.
	lastAt := sched.giveUpAt
	if late := time.Since(lastAt); late >= 0 && (late > lastAttemptGrace || !j.answeredBefore) {
		lastAt = time.Time{}
	}
	var last dlf.Verdict
	called := false // in this delivery; last is only known then
	for {
		select {
		case <-w.stopping:
			w.giveBack(j, 0, "shutdown")
			return
		default:
		}
		v, res := w.call(j, req, lastAt)
		switch res {
		case callStopped:
			w.giveBack(j, 0, "shutdown")
			return
		case callUnmarked:
			// The bucket did not store the mark: no call is made. A
			// bucket that refuses writes (full, limited by an operator,
			// without a leader) refuses every mark, so the command waits
			// in the stream like one held by an open circuit, returned
			// with a delay that grows per delivery, and is not given up:
			// giving up would decide it without the call it is owed, and
			// a decision the bucket cannot record would be decided again
			// by every later delivery. Only its deadline ends it.
			w.checkState()
			delay := w.redeliveryDelay(meta.NumDelivered)
			if dl := cmd.Deadline; cmd.HasDeadline {
				delay = max(min(delay, dl.Sub(w.now())), 0)
			}
			w.giveBack(j, delay, "state_unavailable")
			return
		case callExpired:
			detail := expiredBeforeCall(j)
			if called {
				detail = fmt.Sprintf("deadline %s passed before the next attempt; last: %s",
					cmd.Deadline.Format(time.RFC3339Nano), describe(last))
			}
			w.finish(j, StatusExpired, CauseDeadlinePassed, detail)
			return
		}
		last, called = v, true
		if v.HTTPStatus == 400 && v.ErrorCode == "DLF.6205" {
			if j.unanswered {
				w.finish(j, StatusStopped, CauseAlreadyStopped,
					"DLF.6205 after an earlier call that was sent and got no answer: that call stopped the instance")
				return
			}
			why, handled, undecided := w.stoppedMeanwhile(j)
			switch {
			case handled:
				return
			case why != "":
				w.finish(j, StatusStopped, CauseAlreadyStopped, why)
				return
			case undecided: // only at a shutdown
				w.giveBack(j, 0, "shutdown")
				return
			}
		}
		switch v.Class {
		case dlf.ClassStopped:
			w.finish(j, StatusStopped, CauseOK, "")
			return
		case dlf.ClassFailed:
			detail := "DLF refused the stop: " + describe(v)
			if v.NotSent {
				detail = describe(v) // refused here, not by DLF
			}
			w.finish(j, StatusFailed, CauseDLFError, detail)
			return
		}
		if w.hard.Err() != nil {
			w.giveBack(j, 0, "shutdown")
			return
		}
		now := w.now()
		wait, ok := sched.next(now, v.RetryAfter)
		if !ok {
			w.finish(j, StatusFailed, CauseRetriesExhausted,
				fmt.Sprintf("still failing %s after the command was stored (RETRY_MAX_ELAPSED); last: %s",
					now.Sub(j.meta.Timestamp).Round(time.Millisecond), describe(v)))
			return
		}
		if cmd.HasDeadline && !now.Add(wait).Before(cmd.Deadline) {
			w.finish(j, StatusExpired, CauseDeadlinePassed,
				fmt.Sprintf("deadline %s passes before the next attempt; last: %s",
					cmd.Deadline.Format(time.RFC3339Nano), describe(v)))
			return
		}
		if !w.waitInProcess(j, wait) {
			return
		}
		if why, handled := w.stoppedWhileWaiting(j); handled {
			return
		} else if why != "" {
			w.finish(j, StatusStopped, CauseAlreadyStopped, why)
			return
		}
	}
}

// storePending stores the outcome of pending entry e, decided by an
// earlier or another delivery that could not finish it (the outcome, its
// dead letter or the record not stored), without calling DLF: its
// attempts, whether the outcome is stored already, and a stop the writing
// delivery's own call made (see decidedMeanwhile) come with it. False when
// the entry's outcome cannot be read.
func (w *Worker) storePending(j *job, e *cmdEntry, why string) bool {
	var o Outcome
	if err := json.Unmarshal(e.Outcome, &o); err != nil {
		return false
	}
	j.out, j.attempts, j.decided, j.outcomeStored, j.ownStop = o, e.Attempts, true, e.OutcomeStored, e.OwnStop
	j.log.Info(why)
	w.store(j)
	return true
}

// stoppedWhileWaiting reads the instance's document again after a wait in
// the worker before the next attempt, and says why the instance counts as
// stopped when another command's stop was recorded meanwhile: it is
// already_stopped, with no call (contract section 6; found by review: the
// retry called DLF and read the DLF.6205 as that stop, attempts and
// http_status telling of a call the contract says is not made). Only a
// command that waits to retry pays the read; a failed read leaves the
// call to go ahead, as before.
//
// The same read shows whether another delivery of this command decided it
// meanwhile (acked without a call or an outcome) or stored a decision it
// could not finish (stored now): handled says so (found by review: the
// retry called DLF for a command the bucket recorded as decided).
func (w *Worker) stoppedWhileWaiting(j *job) (why string, handled bool) {
	if w.state == nil || !j.valid {
		return "", false
	}
	recs, err := w.state.lookupWait(w.soft, j.stateKeys())
	if err != nil {
		return "", false
	}
	if decision, here := w.decidedIn(w.soft, j, recs, w.state.lookupWait); decision != nil {
		w.ackDecidedElsewhere(j, here)
		return "", true
	}
	d := &recs[0].doc // its old stop forgotten by decidedIn
	if e := d.Cmds[j.sid]; e != nil && e.Phase == phasePending {
		j.state = recs[0]
		if w.storePending(j, e, "another delivery decided this command while it waited to retry; storing its outcome") {
			return "", true
		}
	}
	if d.StoppedBy == "" {
		return "", false
	}
	j.state = recs[0] // the decision record goes on from what is there now
	return fmt.Sprintf("instance already stopped by command %s at %s, while this command waited to retry", shownID(d.StoppedBy), d.StoppedAt), false
}

// lastAttemptGrace is how late after its give-up time a delivery of a
// command that made calls may begin and still be its last attempt (see
// process): a wait handed back to end at the give-up time comes back
// within a pull (pullWait) and the redelivery's way through JetStream.
const lastAttemptGrace = 5 * time.Second

// waitInProcess sleeps before the next attempt when the wait is short and
// few commands are already sleeping; otherwise it hands the command back
// with NakWithDelay so it holds nothing here while it waits. It reports
// whether the caller should go on with the next attempt.
func (w *Worker) waitInProcess(j *job, wait time.Duration) bool {
	select {
	case <-w.stopping:
		w.giveBack(j, 0, "shutdown")
		return false
	default:
	}
	if wait > w.cfg.ShortWaitMax {
		w.m.retries.WithLabelValues("redelivery").Inc()
		w.giveBack(j, wait, "backoff")
		return false
	}
	if w.waiting.Add(1) > int64(w.cfg.Concurrency) {
		w.waiting.Add(-1)
		w.m.retries.WithLabelValues("redelivery").Inc()
		w.giveBack(j, wait, "backoff")
		return false
	}
	defer w.waiting.Add(-1)
	w.m.retries.WithLabelValues("in_process").Inc()
	j.log.Debug("retrying in-process", zap.Int("attempt", j.attempts), zap.Duration("wait", wait))
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-w.stopping:
		w.giveBack(j, 0, "shutdown")
		return false
	}
}

type callResult int

const (
	callMade     callResult = iota
	callStopped             // shutdown came first: no call was made
	callExpired             // the command's deadline passed before it could be sent: no call was made
	callUnmarked            // the "sent" mark could not be stored, so no call was made
)

// call makes one DLF attempt and records what the answer says on the job.
// Before the call it passes the circuit (waiting while it is open, unless
// chosen as the probe), a 429's pause, a concurrency slot and then the
// rate limiter; only the call itself (and the limiter's wait just before
// it, so that no burst above DLF_RATE_BURST can build up behind busy
// slots) holds the slot. A circuit that opened during those waits sends
// the call back to it.
//
// Each of those waits ends at a soft stop (callStopped: the command goes
// back at once) and at the command's deadline (callExpired: a call is
// never started after the deadline). At lastAt (zero: never) the circuit
// and a 429's pause stop holding the command back: the contract owes it
// one last attempt when its time is up, so that it ends within DLF_TIMEOUT
// of RETRY_MAX_ELAPSED. A configured DLF_RATE_LIMIT still applies to it.
func (w *Worker) call(j *job, req dlf.StopRequest, lastAt time.Time) (v dlf.Verdict, res callResult) {
	ctx := w.soft
	if dl := j.cmd.Deadline; j.cmd.HasDeadline {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(w.soft, dl)
		defer cancel()
	}
	// What this call holds until the client takes it over (attempt gives
	// both back however the call ends): a panic before then must give
	// them back too. The probe turn kept, the circuit would never probe
	// again and the worker stay paused after DLF recovered; the slot
	// kept, the worker would make one call fewer for good.
	var ownProbe, ownSlot bool
	defer func() {
		if !ownProbe && !ownSlot {
			return
		}
		if r := recover(); r != nil {
			if ownSlot {
				<-w.slots
			}
			if ownProbe {
				w.circ.release(true, 0, v, true, dlf.StopRequest{})
			}
			panic(r)
		}
	}()
	// freeSlot gives back the slot this call took, before the call.
	freeSlot := func() {
		<-w.slots
		ownSlot = false
	}
	notSent := func(probe bool) (dlf.Verdict, callResult) {
		ownProbe = false
		w.circ.release(probe, 0, v, true, dlf.StopRequest{})
		if w.soft.Err() != nil {
			return v, callStopped
		}
		return v, callExpired
	}
	probe, ok := w.circ.acquire(ctx, lastAt)
	ownProbe = probe
	if !ok {
		if w.soft.Err() != nil {
			return v, callStopped
		}
		return v, callExpired
	}
	// A 429 or an opening circuit may come while this command waits for a
	// slot or a rate token. Both are checked again after each wait, and
	// the slot is given back for them: a pause is waited out, an open
	// circuit sends the command back for a probe turn. A rate wait ends
	// early when the circuit changes, handing its token back, so calls held
	// back spend no tokens and the probe does not queue behind them.
	var gen uint64      // the circuit's generation at the last check; see generation
	var pauseGen uint64 // the throttle's, likewise
	held := func() bool {
		gen, pauseGen = w.circ.generation(), w.thr.generation()
		return w.thr.pausedFor(lastAt) || w.circ.holdsBack(probe, lastAt)
	}
	mark := func() error {
		rev, err := w.state.markSentKey(ctx, j.idKey(), j.sid, j.meta.NumDelivered, j.meta.Sequence.Stream, j.inst, j.markRev)
		if err == nil {
			j.markRev = rev
			w.marksRefused.clear()
		}
		return err
	}
	// heldBack gives the slot back for a call held back after its slot
	// was taken, and takes back this delivery's mark if it has sent no
	// call yet: the wait ahead (an outage, a pause) may be long, and a
	// delivery that dies in it sent nothing. (After a call the mark stays:
	// it is what tells the next delivery that the call may have gone
	// unanswered.) A take-back that fails may still have been stored (its
	// answer lost), so the delivery marks again before it calls, over the
	// revision of its own mark: a call sent on a mark the take-back
	// replaced would leave only a "held" mark behind, and a redelivery
	// would take its DLF.6205 for a failure. If the take-back was stored,
	// that mark is refused and the command goes back to be read again.
	// A delivery that knows of an earlier call that went unanswered keeps
	// its mark: the mark stands for that call too, and taken back it
	// would leave a delivery after this one, should this one die, nothing
	// to explain its DLF.6205 with.
	heldBack := func() {
		freeSlot()
		if j.marked && !j.called && !j.unanswered {
			rev, err := w.state.retractMark(ctx, j.sid, j.meta.NumDelivered, j.meta.Sequence.Stream, j.inst, j.markRev)
			if err != nil {
				j.log.Debug("could not take the call's mark back while it is held back; marking again before the call", zap.Error(err))
				j.marked = false
				return
			}
			j.marked, j.markRev = false, rev
		}
	}
	for {
		if w.circ.holdsBack(probe, lastAt) {
			probe, ok = w.circ.acquire(ctx, lastAt)
			ownProbe = probe
			if !ok {
				if w.soft.Err() != nil {
					return v, callStopped
				}
				return v, callExpired
			}
		}
		if err := w.thr.waitPause(ctx, lastAt); err != nil {
			return notSent(probe)
		}
		if w.state != nil && !j.marked && !w.thr.limited() {
			// Without a rate limit the mark goes before the wait for a
			// slot, which it would otherwise hold for its round trip:
			// that cost a tenth of the throughput at 50 ms DLF latency
			// (README, "the state bucket"). A delivery that dies while it
			// waits for a slot (the calls ahead of it) leaves its mark.
			if err := mark(); err != nil {
				ownProbe = false // unmarked gives it back
				return w.unmarked(ctx, j, probe, v, err, notSent)
			}
			j.marked = true
		}
		select {
		case w.slots <- struct{}{}:
		case <-ctx.Done():
			return notSent(probe)
		}
		ownSlot = true
		if ctx.Err() != nil { // both were ready and select took the slot
			freeSlot()
			return notSent(probe)
		}
		if held() {
			heldBack()
			continue
		}
		var err error
		if w.thr.limited() { // a method value passed on would be allocated on every call
			err = w.thr.waitRate(ctx, w.circ.changedCh)
		}
		if errors.Is(err, errRateWoken) {
			freeSlot()
			continue
		}
		if err != nil || ctx.Err() != nil { // the token and the deadline may come together
			freeSlot()
			return notSent(probe)
		}
		if held() {
			heldBack()
			continue
		}
		if w.state == nil || j.marked {
			break
		}
		// Under a rate limit, marked with the slot and the token in
		// hand, right before the call: a delivery that dies while it
		// waits for its token (seconds, at a low limit) or while the
		// circuit holds it leaves no mark, so a DLF.6205 its redelivery
		// gets is not taken for its own stop. The slot waits out the
		// round trip, which costs little where the limit sets the pace.
		if err := mark(); err != nil {
			freeSlot()
			ownProbe = false // unmarked gives the turn back
			return w.unmarked(ctx, j, probe, v, err, notSent)
		}
		j.marked = true
		// A 429 or an opening circuit that came during the round trip
		// still holds the call back, and the mark is taken back.
		if !held() {
			break
		}
		heldBack()
	}
	if w.cfg.beforeCall != nil {
		w.cfg.beforeCall(probe)
	}
	called := j.called
	j.called = true                  // before: a panic in the client may come after the request left
	ownProbe, ownSlot = false, false // attempt gives them back however it ends
	v, elapsed, err := w.attemptTracked(j, req, probe, gen)
	if v.NotSent {
		// Refused here before anything left (it could not be built or
		// signed): not a DLF call, neither for attempts (contract section
		// 4) nor for the metrics, nor as a call the mark must stand for.
		j.called = called
		j.log.Warn("the DLF request could not be built or signed; no call was made", zap.Error(err))
		return v, callMade
	}
	j.attempts++
	if answeredByDLF(v) { // a refusal (DLF.6205, say) got past the gateway's limit as well
		w.thr.succeeded(pauseGen)
	}
	if v.NotAnswered {
		j.unanswered = true
	}
	w.m.observeCall(v.HTTPStatus, elapsed)
	// The status is the last attempt's, 0 when it got no answer; the error
	// body and the request id are the last answer's (contract section 4),
	// so an attempt without one leaves what DLF said before.
	j.out.HTTPStatus = v.HTTPStatus
	if v.HTTPStatus != 0 {
		j.out.ErrorCode = v.ErrorCode
		j.out.ErrorMsg = v.ErrorMsg
		j.out.DLFRequestID = v.RequestID
	}
	if v.Class != dlf.ClassStopped {
		j.log.Debug("DLF call did not stop the instance", zap.Int("attempt", j.attempts),
			zap.Int("http_status", v.HTTPStatus), zap.String("error_code", v.ErrorCode), zap.Error(err))
	}
	return v, callMade
}

// unmarked ends a call whose "sent" mark could not be stored: nothing is
// sent, and the command goes back (or, its time up, ends as notSent says).
func (w *Worker) unmarked(ctx context.Context, j *job, probe bool, v dlf.Verdict, err error,
	notSent func(bool) (dlf.Verdict, callResult)) (dlf.Verdict, callResult) {
	if ctx.Err() != nil {
		return notSent(probe)
	}
	w.circ.release(probe, 0, v, true, dlf.StopRequest{})
	if errors.Is(err, errWrongRevision) {
		// Not a bucket refusing writes: another delivery marked this
		// command since this one read its key, or the read came from a
		// replica behind the mark. The redelivery reads it again.
		j.log.Warn("the command's state moved since it was read; returning the command to read it again", zap.Error(err))
		return v, callUnmarked
	}
	w.marksRefused.seen()
	j.log.Warn("could not record the call before making it; returning the command", zap.Error(err))
	return v, callUnmarked
}

// attemptTracked is attempt, registered with the calls of this worker for
// the same instance (see siblings), with the state bucket on.
func (w *Worker) attemptTracked(j *job, req dlf.StopRequest, probe bool, gen uint64) (v dlf.Verdict, elapsed time.Duration, err error) {
	if w.state == nil || !j.valid {
		return w.attempt(req, probe, gen)
	}
	key := j.inst
	t := w.sib.begin(key)
	stopped := false
	defer func() { // a panic in the client must not leave the call on the wire here either
		j.sibLimit = w.sib.end(key, t, j.sid, stopped, time.Now())
		j.noted = j.noted || stopped
	}()
	v, elapsed, err = w.attempt(req, probe, gen)
	stopped = v.Class == dlf.ClassStopped
	return v, elapsed, err
}

// attempt sends the request on a slot the caller took, tells the circuit
// the answer, and gives the slot back however it ends. A panic in the
// client must not keep the slot, nor the circuit's probe turn: either loss
// would stall the worker for good.
func (w *Worker) attempt(req dlf.StopRequest, probe bool, gen uint64) (v dlf.Verdict, elapsed time.Duration, err error) {
	answered := false
	defer func() {
		w.m.inFlight.Dec()
		// The circuit hears the answer before the slot is given back, as
		// a 429's pause is set (below): a command waiting for this slot
		// checks the circuit once it has the slot, and must not slip a
		// call past the 401 that is opening it.
		w.circ.release(probe, gen, v, !answered || w.hard.Err() != nil, req)
		<-w.slots
	}()
	w.m.inFlight.Inc()
	ctx, cancel := context.WithTimeout(w.hard, w.cfg.CallTimeout)
	defer cancel()
	start := time.Now()
	resp, err := w.dlf.Stop(ctx, req)
	elapsed = time.Since(start)
	v = dlf.Classify(resp, err)
	answered = true
	if v.HTTPStatus == 429 {
		// Paused before the slot is given back: a command waiting for
		// this slot checks the pause once it has the slot, and must not
		// find it unset and slip a call into the throttled gateway.
		w.m.throttled.Inc()
		w.thr.throttled(max(v.RetryAfter, w.cfg.RetryInitial))
	}
	return v, elapsed, err
}

// expiredBeforeCall is the detail of a command whose deadline passed
// before this delivery made a call; earlier deliveries may have made some,
// and their last answer is on the job (see recall).
func expiredBeforeCall(j *job) string {
	dl := j.cmd.Deadline.Format(time.RFC3339Nano)
	if j.attempts == 0 {
		return fmt.Sprintf("deadline %s passed before the first call", dl)
	}
	last := dlf.Verdict{HTTPStatus: j.out.HTTPStatus, ErrorCode: j.out.ErrorCode, ErrorMsg: j.out.ErrorMsg,
		NotAnswered: j.markCounted}
	return fmt.Sprintf("deadline %s passed before the next attempt (after %d in earlier deliveries); last: %s",
		dl, j.attempts, describe(last))
}

// describe renders a verdict for the outcome's detail.
func describe(v dlf.Verdict) string {
	switch {
	case v.HTTPStatus == 0:
		if v.NotAnswered {
			return "no answer from DLF after the request was sent"
		}
		if v.NotSent {
			return "the request could not be built or signed, so no call was made"
		}
		return "DLF could not be reached"
	case v.ErrorCode != "" && v.ErrorMsg != "":
		return fmt.Sprintf("HTTP %d %s: %s", v.HTTPStatus, v.ErrorCode, v.ErrorMsg)
	case v.ErrorCode != "":
		return fmt.Sprintf("HTTP %d %s", v.HTTPStatus, v.ErrorCode)
	default:
		return fmt.Sprintf("HTTP %d", v.HTTPStatus)
	}
}

// giveBack returns the command undecided. delay 0 means at once. With the
// state bucket it first records how far the command got, so the next
// delivery counts attempts on and knows whether a call went unanswered;
// decisionStored says the document it stored holds the command's decision
// (the one in memory, a hand-back at a stop: a re-read after a conflict
// holds a pending entry instead).
func (w *Worker) giveBack(j *job, delay time.Duration, reason string) (decisionStored bool) {
	if j.state != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(w.hard), publishTimeout)
		entry := cmdEntry{Phase: phaseAnswered, Attempts: j.attempts, Unanswered: j.unanswered, Delivery: j.meta.NumDelivered,
			Seq: j.meta.Sequence.Stream, LastHTTPStatus: j.out.HTTPStatus, LastErrorCode: j.out.ErrorCode,
			LastErrorMsg: strings.TrimRight(truncateUTF8(j.out.ErrorMsg, maxStoredErrorMsg), " "), LastRequestID: j.out.DLFRequestID}
		if j.decided {
			if b, err := json.Marshal(&j.out); err == nil {
				entry.Phase, entry.Outcome, entry.OutcomeStored = phasePending, b, j.outcomeStored
				entry.OwnStop = j.ownStop
			}
		}
		// What this delivery knew of the id's marks, so that a mark an
		// overlapping delivery stores after it still counts.
		markRev := j.markRev
		entry.MarkRev = &markRev
		entry.At = time.Now().Unix()    // the real clock: this only ages entries out
		var dropped map[string]cmdEntry // by every try: see store
		var decided bool
		err := w.state.save(ctx, j.state, func(d *stateDoc) {
			collect(&dropped, d.setProgress(j.sid, entry, w.cfg.StateTTL))
			decided = decidedIn(d, j.sid)
		})
		cancel()
		if err != nil {
			// The next delivery then finds this one's "sent" mark newer
			// than any entry, if it called, and counts the call as
			// unanswered: the safe side.
			j.log.Warn("could not record progress in the state bucket", zap.Error(err))
		} else {
			decisionStored = decided
			w.state.indexDropped(dropped)
		}
	}
	w.awaitPullsClosed()
	// No heartbeat may follow the nak: JetStream takes an InProgress as
	// the command being worked on again, and its ack wait then replaces
	// the nak's delay (nats-server's progressUpdate).
	if j.hb != nil {
		j.hb.stop()
	}
	var err error
	if delay > 0 {
		err = j.msg.NakWithDelay(delay)
	} else {
		err = j.msg.Nak()
	}
	w.m.returned.WithLabelValues(reason).Inc()
	if err != nil {
		// The ack wait will bring it back anyway; nothing is lost.
		j.log.Warn("could not return command; it comes back after the ack wait", zap.Error(err))
		return decisionStored
	}
	j.log.Debug("command returned to JetStream", zap.String("reason", reason), zap.Duration("delay", delay),
		zap.Int("attempt", j.attempts))
	return decisionStored
}

// finish stores the outcome (and the dead letter when the status is not
// stopped) and acks only after JetStream confirmed both.
func (w *Worker) finish(j *job, status, cause, detail string) {
	w.finishAt(j, w.now(), status, cause, detail)
}

func (w *Worker) finishAt(j *job, now time.Time, status, cause, detail string) {
	o := &j.out
	if status == StatusStopped && detail != "" {
		// The contract gives detail to every status but stopped; why an
		// instance counts as already stopped goes to the log instead.
		j.log.Info("instance counts as already stopped", zap.String("why", detail))
		detail = ""
	}
	o.Status, o.Cause, o.Detail = status, cause, detail
	o.Attempts = j.attempts
	o.FinishedAt = FormatTime(now)
	o.DurationMS = now.Sub(j.meta.Timestamp).Milliseconds()
	j.decided = true
	w.store(j)
}

// store publishes the decided outcome j.out (and its dead letter), records
// the decision in the state bucket and acks. If any step fails the command
// is returned, and the state bucket keeps the decision so the next
// delivery stores the very same outcome instead of calling DLF again (a
// second call after a 204 would get DLF.6205).
func (w *Worker) store(j *job) {
	o := &j.out
	ctx, cancel := context.WithTimeout(w.hard, publishTimeout)
	defer cancel()
	// Published once only: a republish is dropped as a duplicate for just
	// two minutes, and a dead-letter stream that stays broken for longer
	// would otherwise store a copy of the outcome every two minutes.
	if !j.outcomeStored && w.decidedMeanwhile(ctx, j) {
		return
	}
	if !j.outcomeStored { // decidedMeanwhile may have adopted a stored one
		ack, err := w.pub.publishOutcome(ctx, o)
		if err != nil {
			w.publishFailed(j, "outcome", err)
			return
		}
		if ack.Duplicate {
			wait, first := w.adoptStored(ctx, j, ack)
			if wait > 0 {
				// Recorded as a pending outcome, published again once
				// the window that dropped it is over.
				w.giveBack(j, wait, "outcome_id_taken")
				return
			}
			if first != nil {
				w.ackReused(j, first, true)
				return
			}
		}
		j.outcomeStored = true
	}
	status, cause := o.Status, o.Cause
	// A duplicate outcome means an earlier delivery stored it already and
	// lost its ack. The dead letter is still published (it deduplicates on
	// the same id): skipping it could lose the dead letter of a delivery
	// that stored its outcome but failed before dead-lettering.
	if status != StatusStopped {
		if err := w.pub.publishDead(ctx, o, j.msg.Data(), j.msg.Subject(), j.meta.Sequence.Stream); err != nil {
			w.publishFailed(j, "dead_letter", err)
			return
		}
	}
	if j.state != nil {
		// Only after the outcome is stored may the command be recorded as
		// decided: a decided record makes every later delivery a silent ack.
		// Nothing waits for the write; its answer acks the command.
		// The id index goes out first, ahead of the decision:
		// the outcome is stored, so the id is decided whatever becomes of
		// the write below (if that fails, the redelivery finds the index
		// and is acked without storing the outcome again). Published
		// before the write, it also leaves before the write's answer can
		// ack the command and let a stopping worker close its connection.
		// A delivery that marked its call needs no index: the mark is one.
		if j.valid && !j.marked {
			w.state.markDecided(j.sid, cmdEntry{Phase: phaseDecided, Attempts: j.attempts, Status: status, Cause: cause})
		}
		ds := &decisionSave{w: w, j: j,
			entry:   cmdEntry{Phase: phaseDecided, Attempts: j.attempts, Status: status, Cause: cause, At: time.Now().Unix()}, // the real clock: this only ages entries out
			stopped: (status == StatusStopped || j.ownStop) && j.valid,
		}
		w.state.saveAsync(w.hard, j.state, ds)
		// Set only once the write is under way (a panic before leaves the
		// release to run), and read only by this goroutine.
		j.handedOff = true
		return
	}
	w.acked(j)
}

// decisionSave is the write of a command's decision record once its
// outcome is stored (see store): what saveAsync applies to the document,
// and what follows the write's answer. One value rather than three
// closures, as it is made for every command.
type decisionSave struct {
	w       *Worker
	j       *job
	entry   cmdEntry
	stopped bool // the command's call stopped the instance
	// dropped gathers the entries dropped for room by any application
	// of change: a retry applies it to a document already pruned, which
	// drops nothing.
	dropped map[string]cmdEntry
}

func (ds *decisionSave) change(d *stateDoc) {
	j := ds.j
	collect(&ds.dropped, d.setDecided(j.sid, ds.entry, ds.stopped, j.out.FinishedAt, ds.w.cfg.StateTTL))
	j.stopRecorded = d.StoppedBy == j.sid
}

func (ds *decisionSave) stored() {
	ds.w.state.indexDropped(ds.dropped)
	ds.w.acked(ds.j)
	ds.j.release()
}

func (ds *decisionSave) failed(err error) {
	w, j := ds.w, ds.j
	defer j.release()
	defer func() {
		// A change that panicked in the write (see applyGroup) panics
		// again here: the command is returned, as a panic on its own
		// goroutine returns it.
		if r := recover(); r != nil {
			w.recovered(j.msg, j, r)
		}
	}()
	w.recordDecisionLater(j, ds.change, err)
	// Whether the record was written, or the stop's hand-back wrote the
	// document (already pruned, so that write drops nothing itself):
	// entries dropped for room are decided, and indexing them is right
	// either way.
	w.state.indexDropped(ds.dropped)
}

// decidedMeanwhile looks again, before a delivery held for long publishes
// its outcome, whether another delivery of the command decided it
// meanwhile; if so it acks this one without an outcome and says true.
// Deliveries overlap when a delivery's heartbeats are lost (a consumer
// leader change, a long reconnect) and JetStream hands the command to
// another worker after the ack wait. The first one's decision may then
// come minutes later (it waits out an open circuit up to
// RETRY_MAX_ELAPSED), past the outcome stream's duplicate window, and
// would be a second outcome event. A delivery younger than half its ack
// wait cannot have been overtaken, and pays nothing.
func (w *Worker) decidedMeanwhile(ctx context.Context, j *job) bool {
	if w.state == nil || time.Since(j.received) < w.ackWaitNow()/2 {
		return false
	}
	recs, err := w.state.lookupWait(ctx, j.stateKeys())
	if err != nil {
		return false // a failed read: the record write after the outcome settles it, or fails
	}
	decision, here := w.decidedIn(ctx, j, recs, w.state.lookupWait)
	if decision == nil {
		// Another delivery decided and stored its outcome, but not what
		// follows it (a dead letter, the record): its pending entry says
		// so. That outcome stands; this delivery stores what is missing
		// (found by review: past the duplicate window it published a
		// second outcome event, of its own decision).
		if e := recs[0].doc.Cmds[j.sid]; e != nil && e.Phase == phasePending && e.OutcomeStored {
			var o Outcome
			if err := json.Unmarshal(e.Outcome, &o); err == nil {
				// A stop this delivery's own call made is recorded too,
				// as ackReused does (found by review: a later command
				// for the instance called DLF and failed on DLF.6205).
				j.ownStop = (j.valid && j.out.Status == StatusStopped) || e.OwnStop
				j.out, j.attempts, j.decided, j.outcomeStored = o, e.Attempts, true, true
				j.state = recs[0]
				j.log.Info("another delivery decided this command meanwhile and stored its outcome; storing what it could not")
			}
		}
		return false
	}
	if j.valid && j.out.Status == StatusStopped {
		// This delivery's call stopped the instance, while the command
		// was decided elsewhere: for another instance (a message reusing
		// the id) or, by another delivery, otherwise. The stop is
		// recorded without an outcome, as it is when the duplicate window
		// drops the outcome (ackReused), so that a later command for this
		// instance is already_stopped rather than a DLF.6205 failure
		// (found by review: with the decision here, it was not).
		w.ackReused(j, &Outcome{Status: decision.Status, Cause: decision.Cause}, !here)
		return true
	}
	w.ackDecidedElsewhere(j, here)
	return true
}

// decidedIn returns the decision of j's command that the state read in
// recs (j.stateKeys) holds, nil when none, following the id's "sent" mark
// to the document of another instance key; here says it is this
// message's own decision: found in the document of j's own instance, or
// through the mark of this same message (its stream sequence) read under
// other defaults, as recall tells them apart (found by review: that case
// was counted as a reused id). A stop older than STATE_TTL is forgotten
// first, as recall forgets it.
// read reads the other instance's document (lookupWait, or lookupLeader
// where a stale answer costs a wrong outcome).
func (w *Worker) decidedIn(ctx context.Context, j *job, recs []*stateRecord,
	read func(context.Context, []string) ([]*stateRecord, error)) (decision *cmdEntry, here bool) {
	decidedIn := func(d *stateDoc) *cmdEntry {
		d.forgetOldStop(time.Now().Unix(), w.cfg.StateTTL)
		if d.StoppedBy == j.sid {
			return &cmdEntry{Phase: phaseDecided, Status: StatusStopped}
		}
		if e := d.Cmds[j.sid]; e != nil && e.Phase == phaseDecided {
			return e
		}
		return nil
	}
	if e := decidedIn(&recs[0].doc); e != nil {
		return e, true
	}
	if len(recs) < 2 {
		return nil, false
	}
	switch e := recs[1].doc.Cmds[j.sid]; {
	case e == nil:
	case e.Phase == phaseDecided:
		return e, false
	case e.Phase == phaseSent && e.Inst != "" && e.Inst != j.inst:
		// The other delivery read the command under other defaults, or
		// another message with this id names another instance: its
		// decision, there, makes the id final (contract section 6), as
		// recall finds.
		if other, err := read(ctx, []string{instKey(e.Inst)}); err == nil {
			return decidedIn(&other[0].doc), e.Seq == j.meta.Sequence.Stream
		}
	}
	return nil, false
}

// ackDecidedElsewhere acks a delivery whose command another delivery
// decided, without an outcome of its own. here says the decision is this
// message's own (see decidedIn); otherwise the id was decided for another
// message naming another instance: a reused id, counted as recall counts
// it (found by review: after a re-read it was not).
func (w *Worker) ackDecidedElsewhere(j *job, here bool) {
	if err := j.msg.Ack(); err != nil {
		j.log.Warn("ack of a command another delivery decided failed", zap.Error(err))
	}
	w.m.skipped.Inc()
	if !here {
		w.m.reusedIDs.Inc()
		j.log.Warn("command id decided for another instance while this command was held; acked without a stop or an outcome",
			zap.String("dropped_status", j.out.Status), zap.String("dropped_cause", j.out.Cause))
		return
	}
	j.log.Warn("another delivery decided this command while this one was held; acked without a second outcome",
		zap.String("dropped_status", j.out.Status), zap.String("dropped_cause", j.out.Cause))
}

// stoppedMeanwhile looks at the state again after a DLF.6205 that nothing
// read before the call explains: another command may have recorded
// stopping the instance, or another delivery of this command marked its
// call, after this delivery's lookup. Both race with this delivery's call
// (two schedulers stopping one instance at once; deliveries that overlap
// because one lost its heartbeats), and either makes the DLF.6205 a stop
// (contract section 6). It returns why the instance counts as stopped, or
// "" when it does not; handled says another delivery decided the command
// already, and this one has been acked without an outcome or is storing
// the outcome that delivery could not; undecided says the worker is
// shutting down and could not read the state again, and the command goes
// back undecided rather than failing on a DLF.6205 a record may explain.
//
// Another replica's stop races the same way, and this worker does not
// see its call: DLF answered that call before this one (it stopped the
// instance first), but its record comes only after its outcome is
// stored. So a DLF.6205 nothing explains is looked at again for
// stopRecordWait before it fails (found by review: with two or three
// replicas, one of the commands for an instance stopped at once was
// often dead-lettered). The wait holds no call slot, token or probe turn,
// but the command stays held: a flood of stops for instances that ended
// long ago is decided at most held-limit commands per stopRecordWait.
func (w *Worker) stoppedMeanwhile(j *job) (why string, handled, undecided bool) {
	if w.state == nil || !j.valid {
		return "", false, false
	}
	// Before the bucket: a stop of this worker is forgotten once the
	// bucket's leader acknowledged a record naming it, so the read below,
	// from the leader, then finds it; a direct get might be answered by
	// a follower that has not applied it yet. The calls waited for end
	// within DLF_TIMEOUT; the read has its own time after that.
	sibling, siblingAt, bySibling := w.sib.stoppedBy(w.hard, j.inst, j.sid, j.sibLimit, w.cfg.CallTimeout)
	deadline := time.Now().Add(stopRecordWait)
	pause := 100 * time.Millisecond
	for {
		why, handled, err := w.stopRecorded(j)
		switch {
		case err != nil:
			j.log.Debug("state not read again after DLF.6205", zap.Error(err))
			if bySibling {
				return siblingStop(sibling, siblingAt), false, false
			}
			// Only a shutdown returns the command: a bucket that fails
			// to answer fails the hand-back's record too, and the next
			// delivery would take this answered call for one that got no
			// answer (found by review: stopped, already_stopped, after a
			// second call, for an instance nothing had stopped).
			return "", false, w.hard.Err() != nil
		case handled || why != "":
			return why, handled, false
		case bySibling:
			return siblingStop(sibling, siblingAt), false, false
		}
		left := time.Until(deadline)
		if left <= 0 {
			return "", false, false // a DLF.6205 without a record: it fails
		}
		t := time.NewTimer(min(pause, left))
		select {
		case <-t.C:
		case <-w.hard.Done():
			t.Stop()
			return "", false, true
		}
		pause *= 2
	}
}

// stopRecordWait is how long a DLF.6205 that nothing explains waits for
// the record of a stop another replica's call made just before this
// one's: that call has its answer already, and needs only to store its
// outcome and its decision record, milliseconds as a rule. The leader is
// read at once, then 100, 300 and 700 ms later, and at its end.
const stopRecordWait = time.Second

// stopRecorded reads the state from the bucket's leader once, for
// stoppedMeanwhile.
func (w *Worker) stopRecorded(j *job) (why string, handled bool, err error) {
	ctx, cancel := context.WithTimeout(w.hard, publishTimeout)
	defer cancel()
	recs, err := w.state.lookupLeader(ctx, j.stateKeys())
	if err != nil {
		return "", false, err
	}
	if decision, here := w.decidedIn(ctx, j, recs, w.state.lookupLeader); decision != nil {
		w.ackDecidedElsewhere(j, here)
		return "", true, nil
	}
	d := &recs[0].doc // its old stop forgotten by decidedIn
	j.state = recs[0] // the decision record goes on from what is there now
	// A pending or unanswered entry of this command now was written since
	// the lookup by another delivery: this one writes none before it ends,
	// and one there at the lookup would have ended this delivery already,
	// or made it unanswered. A decision whose outcome that delivery could
	// not store is stored now, as recall does, before anything else: its
	// outcome may be in the outcome stream already. An unanswered call of
	// its own explains the DLF.6205.
	e := d.Cmds[j.sid]
	if e != nil && e.Phase == phasePending && w.storePending(j, e, "another delivery decided this command during the call; storing its outcome") {
		return "", true, nil
	}
	if d.StoppedBy != "" {
		return fmt.Sprintf("DLF.6205, and meanwhile the instance was recorded as stopped by command %s at %s",
			shownID(d.StoppedBy), d.StoppedAt), false, nil
	}
	if e != nil && e.Unanswered {
		return fmt.Sprintf("DLF.6205 after delivery %d of this command sent a call that got no answer", e.Delivery), false, nil
	}
	// This delivery's own mark went out before its call, so a mark of
	// another delivery came after it, or is the one the lookup saw (its
	// own was lost); that one was counted then, and its delivery recorded
	// an answer. A mark explains the DLF.6205 if it is for this instance
	// (not this command read under other defaults) and its delivery has
	// recorded no answer since, as recall counts marks.
	if m := recs[1].doc.Cmds[j.sid]; j.markCounts(m, recs[1].rev, e) {
		j.attempts++ // that delivery's call, as recall counts one
		return fmt.Sprintf("DLF.6205, and meanwhile delivery %d of this command marked its call", m.Delivery), false, nil
	}
	return "", false, nil
}

// siblingStop explains a DLF.6205 by the stop another command of this
// worker made on the instance while this one's call was on the wire.
func siblingStop(sid, at string) string {
	return fmt.Sprintf("DLF.6205, and meanwhile command %s stopped the instance at %s (its decision not yet recorded)", shownID(sid), at)
}

// adoptStored makes the outcome an earlier delivery stored this
// command's decision, when this delivery's publish was dropped as its
// duplicate. That delivery died between its outcome and its dead letter
// or decision record, and this one may have decided otherwise: after a
// DLF.6205 that the first call's answer had already reported as failed,
// for one. The dead letter and the decision record must follow the
// outcome the audit consumers saw, not the one that was dropped.
//
// The stored outcome is another message's when its received_at (when
// JetStream stored the command) differs. An id made of the stream sequence
// then names another command, of a stream deleted and created again within
// the window: this one needs its own outcome, and adoptStored returns how
// long to wait before publishing it again (until the window lets the id go,
// at most half STATE_TTL at a time, so that the pending outcome recorded
// meanwhile outlives the wait). An id a publisher chose, published again
// while its first command was undecided, is that same command by the
// contract: the first one's outcome, dead letter and record stand for it,
// and adoptStored says reused (see ackReused). An outcome that cannot be
// read is this command's own, stored by an earlier delivery, unless this is
// the first delivery of a derived id: then it is another command's, and
// the command waits a whole window.
func (w *Worker) adoptStored(ctx context.Context, j *job, ack *jetstream.PubAck) (wait time.Duration, reused *Outcome) {
	o := &j.out
	stored, free, err := w.pub.storedOutcome(ctx, ack.Stream, ack.Sequence, o.CommandID)
	if err != nil {
		if j.cmd.SeqID && j.meta.NumDelivered == 1 {
			j.log.Warn("the outcome holding this derived id cannot be read, and no earlier delivery of this command stored one; publishing again after the window",
				zap.Error(err))
			return max(min(time.Until(free)+time.Second, w.cfg.StateTTL/2), w.cfg.RetryInitial), nil
		}
		j.log.Warn("outcome already stored by an earlier delivery and unreadable; keeping this delivery's decision", zap.Error(err))
		return 0, nil
	}
	if stored.ReceivedAt != o.ReceivedAt {
		if j.cmd.SeqID {
			wait = min(time.Until(free)+time.Second, w.cfg.StateTTL/2)
			j.log.Warn("the outcome of another command with this derived id (a re-created stream) holds the duplicate window; publishing again after it",
				zap.Duration("in", wait))
			return max(wait, w.cfg.RetryInitial), nil
		}
		return 0, stored
	}
	if stored.Status != o.Status || stored.Cause != o.Cause {
		j.log.Warn("an earlier delivery already stored another outcome; following it",
			zap.String("stored_status", stored.Status), zap.String("stored_cause", stored.Cause),
			zap.String("dropped_status", o.Status), zap.String("dropped_cause", o.Cause))
	}
	*o = *stored
	j.attempts = o.Attempts
	return 0, nil
}

// ackReused ends a command whose id a publisher published again while the
// first command with it was undecided, both called DLF, and the first one's
// outcome is stored (contract section 6: the same id is the same command).
// No outcome or dead letter of its own: the first command's stand. Its
// instance's document records what its own call did (the stop it made, or
// the id decided without one), and the id is indexed as decided, as this
// command's mark had replaced the first one's. If that record cannot be
// written the command is returned, as any unrecorded decision: acked, a
// later use of the id could go unrecognised.
//
// Not reused: the same command, decided by another delivery while this
// one's call stopped the instance (decidedMeanwhile); recorded the same
// way, and counted as decided elsewhere.
func (w *Worker) ackReused(j *job, first *Outcome, reused bool) {
	if j.state != nil {
		ctx, cancel := context.WithTimeout(w.hard, publishTimeout)
		var dropped map[string]cmdEntry
		own := j.out
		now := time.Now().Unix()
		entry := cmdEntry{Phase: phaseDecided, Attempts: j.attempts, Status: first.Status, Cause: first.Cause, At: now}
		err := w.state.save(ctx, j.state, func(d *stateDoc) {
			collect(&dropped, d.setDecided(j.sid, entry, own.Status == StatusStopped, own.FinishedAt, w.cfg.StateTTL))
		})
		cancel()
		if err != nil {
			// The bucket fails, not the outcome stream: returned like a
			// command whose mark was refused, with the delay a failing
			// publish gets, and without saying outcomes cannot be stored.
			w.m.publishFail.WithLabelValues("state").Inc()
			w.checkState()
			j.log.Warn("reused id's decision not recorded; returning the command", zap.Error(err))
			if w.soft.Err() != nil {
				w.giveBack(j, 0, "shutdown")
				return
			}
			w.giveBack(j, w.redeliveryDelay(j.meta.NumDelivered), "state_unavailable")
			return
		}
		w.state.indexDropped(dropped)
		w.state.markDecided(j.sid, cmdEntry{Phase: phaseDecided, Attempts: j.attempts, Status: first.Status, Cause: first.Cause})
	}
	if err := j.msg.Ack(); err != nil {
		j.log.Warn("ack of a reused id failed", zap.Error(err))
	}
	if !reused {
		w.m.skipped.Inc()
		j.log.Warn("another delivery decided this command while this one was held; its stop is recorded, acked without a second outcome",
			zap.String("decided_status", first.Status), zap.String("own_status", j.out.Status))
		return
	}
	w.m.reusedIDs.Inc()
	j.log.Warn("this command id was published again while its first command was undecided; the first one's outcome stands",
		zap.String("first_status", first.Status), zap.String("first_instance", first.InstanceID),
		zap.String("own_status", j.out.Status), zap.String("own_cause", j.out.Cause))
}

// recordDecisionLater keeps trying to record a decision whose outcome is
// stored, holding the command (its heartbeats go on) until the record is
// written or the worker stops. Returning it instead would cost more than
// the wait: the state bucket is what is failing, so the record of the
// pending outcome would likely fail too, and a redelivery finding neither
// would call DLF again and, once past the duplicate window, publish a
// second outcome. A stop hands the command back; that hand-back writes
// the document as it is in memory, which already holds the decision (or,
// after a conflict re-read, the pending outcome), a last try.
//
// Once the record is written the id is indexed as decided too: the "sent"
// mark that would index it was written without an answer, by the same
// bucket that was failing.
func (w *Worker) recordDecisionLater(j *job, change func(*stateDoc), err error) {
	w.m.publishFail.WithLabelValues("state").Inc()
	w.checkState()
	j.log.Warn("outcome stored, decision not recorded yet; holding the command and trying again", zap.Error(err))
	wait := w.cfg.RetryInitial
	stopping := w.stopping
	for {
		// Jittered: the records of one document that failed together
		// (their group's write, see saveAsync) must not all try again
		// at once and meet in compare-and-set.
		t := time.NewTimer(wait*3/4 + rand.N(wait/2+1))
		select {
		case <-t.C:
		case <-stopping:
			// A stop does not end the tries: they go on, closer
			// together, for as long as SHUTDOWN_TIMEOUT lets the worker
			// finish what it holds (found by review: one try and a
			// hand-back, and a redelivery after the bucket recovered,
			// past the duplicate window, published a second outcome).
			t.Stop()
			stopping = nil
			wait = min(wait, shutdownRecordWait)
			continue
		case <-w.hard.Done():
			t.Stop()
			// The outcome is stored, and the hand-back writes the
			// decision, a last try: written, the next delivery acks the
			// command as decided and counts nothing, so it counts here
			// (found by review: no worker counted it); not written (the
			// write failed, or a re-read wrote a pending entry), the
			// delivery that records it counts it.
			if w.giveBack(j, 0, "shutdown") {
				w.m.commands.WithLabelValues(j.out.Status, j.out.Cause).Inc()
			}
			return
		}
		ctx, cancel := context.WithTimeout(w.hard, publishTimeout)
		err = w.state.save(ctx, j.state, change)
		cancel()
		if err == nil {
			j.log.Info("decision recorded after all")
			if j.valid {
				w.state.markDecided(j.sid, cmdEntry{Phase: phaseDecided, Attempts: j.attempts, Status: j.out.Status, Cause: j.out.Cause})
			}
			w.acked(j)
			return
		}
		w.m.publishFail.WithLabelValues("state").Inc()
		w.checkState()
		j.log.Debug("decision still not recorded", zap.Error(err))
		if stopping == nil {
			wait = shutdownRecordWait
		} else {
			wait = min(2*wait, w.cfg.RetryMax)
		}
	}
}

// shutdownRecordWait spaces the tries of a decision record once the
// worker is stopping: SHUTDOWN_TIMEOUT (20 s by default) is short.
const shutdownRecordWait = 250 * time.Millisecond

// acked acks a command whose outcome (and decision record) is stored.
func (w *Worker) acked(j *job) {
	o := &j.out
	// Its stop is recorded: the bucket explains a sibling's DLF.6205 now.
	// A record that names another stopper (an older stop, or an outcome
	// an earlier delivery stored and this one adopted) does not; the
	// note then runs out in its own time.
	if j.noted && j.stopRecorded {
		w.sib.forget(j.inst, j.sid)
	}
	status, cause := o.Status, o.Cause
	if err := j.msg.Ack(); err != nil {
		// The outcome is stored; a redelivery repeats it under the same
		// Nats-Msg-Id, which the outcome stream drops as a duplicate.
		j.log.Warn("ack failed after the outcome was stored", zap.Error(err))
	}
	w.m.commands.WithLabelValues(status, cause).Inc()
	w.publishRefused.clear()
	fields := []zap.Field{zap.String("status", status), zap.String("cause", cause),
		zap.Int("attempts", j.attempts), zap.Int("http_status", o.HTTPStatus)}
	if status == StatusStopped {
		j.log.Info("command decided", fields...)
		return
	}
	j.log.Info("command decided", append(fields, zap.String("error_code", o.ErrorCode),
		zap.String("detail", o.Detail))...)
}

func (w *Worker) publishFailed(j *job, kind string, err error) {
	w.m.publishFail.WithLabelValues(kind).Inc()
	j.log.Warn("publish failed; returning the command undecided", zap.String("kind", kind), zap.Error(err))
	if w.soft.Err() != nil {
		w.giveBack(j, 0, "shutdown")
		return
	}
	// Found by review: a deleted outcome stream, which the worker does not
	// create again while it runs, left it ready while nothing could end.
	w.publishRefused.seen()
	// A stream that stays broken must not turn into a tight redelivery
	// loop: the delay grows with the deliveries, as a failing call's would.
	w.giveBack(j, w.redeliveryDelay(j.meta.NumDelivered), "publish_failed")
}

// readAgain retries a failed state lookup while the command stays held,
// for at most SHORT_WAIT_MAX of waits: a stream leader change of a few
// seconds should not cost a redelivery, with its ack wait's delay when the
// nak is lost in the same change.
//
// It holds the command only while less than half the ack wait has passed
// since the delivery came. The in-progress heartbeats that keep a held
// command from being redelivered can be lost in a consumer leader change,
// the very moment lookups fail; a command held past its ack wait may then
// be delivered again while this delivery goes on, and two deliveries
// deciding the same command at once is worse than a redelivery.
func (w *Worker) readAgain(j *job, err error) ([]*stateRecord, error) {
	w.m.stateReadErr.Inc()
	w.checkState()
	deadline := time.Now().Add(w.cfg.ShortWaitMax)
	if held := j.received.Add(w.ackWaitNow() / 2); held.Before(deadline) {
		deadline = held
	}
	for wait := w.cfg.RetryInitial; !time.Now().Add(wait).After(deadline); wait *= 2 {
		j.log.Debug("state bucket unavailable; reading again", zap.Error(err), zap.Duration("in", wait))
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-w.stopping:
			t.Stop()
			return nil, err
		}
		recs, rerr := w.state.lookupWait(w.soft, j.stateKeys())
		if rerr == nil {
			return recs, nil
		}
		w.m.stateReadErr.Inc()
		err = rerr
	}
	return nil, err
}

// instDoc reads the document of instance key inst, for a second read of
// recall's.
func (w *Worker) instDoc(inst string) (*stateDoc, error) {
	recs, err := w.state.lookupWait(w.soft, []string{instKey(inst)})
	if err != nil {
		return nil, err
	}
	d := &recs[0].doc
	d.forgetOldStop(time.Now().Unix(), w.cfg.StateTTL)
	return d, nil
}

// decidedIn says whether d records command sid as decided.
func decidedIn(d *stateDoc, sid string) bool {
	e := d.Cmds[sid]
	return d.StoppedBy == sid || (e != nil && e.Phase == phaseDecided)
}

// recall applies what the state bucket said of the command, read before
// anything is called. It returns false when the delivery was fully handled
// here: already decided (acked silently), already stopped by another
// command, or the bucket could not be read (returned for later).
func (w *Worker) recall(j *job, recs []*stateRecord, err error) bool {
	if err != nil {
		if w.soft.Err() != nil {
			w.giveBack(j, 0, "shutdown")
			return false
		}
		j.log.Warn("state bucket unavailable; returning the command", zap.Error(err))
		w.stateUnread.seen()
		w.checkState()
		w.giveBack(j, w.cfg.RetryInitial, "state_unavailable")
		return false
	}
	w.stateUnread.clear()
	rec := recs[0]
	d := &rec.doc
	d.forgetOldStop(time.Now().Unix(), w.cfg.StateTTL) // the real clock, as it was written
	entry := d.Cmds[j.sid]
	// The id index answers for the same id published again for another
	// instance, however late (contract section 6).
	var indexed, mark *cmdEntry
	if len(recs) > 1 {
		j.markRev = recs[1].rev
		if indexed = recs[1].doc.Cmds[j.sid]; indexed != nil && indexed.Phase == phaseSent {
			mark, indexed = indexed, nil
		}
	}
	sameDecided := false
	if !j.valid && entry != nil && entry.Phase == phaseSent {
		// An invalid command's one key is its id's, and holds the mark of
		// a valid command with this id that made a call: its decision is
		// in the document of the instance the mark names, and decided
		// there, the id is final (found by review: the same id published
		// again with a broken body, after the outcome stream's duplicate
		// window, got a second outcome and a dead letter).
		decided := false
		if entry.Inst != "" {
			od, err := w.instDoc(entry.Inst)
			if err != nil {
				return w.recall(j, nil, err)
			}
			decided = decidedIn(od, j.sid)
		}
		switch {
		case decided && entry.Seq == j.meta.Sequence.Stream:
			// This very message, decided where it was valid (another
			// worker's defaults): a redelivery, not a reused id.
			sameDecided = true
		case decided:
			indexed = &cmdEntry{Phase: phaseDecided}
		}
		entry = nil // a mark, not this command's progress
	}
	here := sameDecided || d.StoppedBy == j.sid || (entry != nil && entry.Phase == phaseDecided)
	sameMsg := mark != nil && mark.Seq == j.meta.Sequence.Stream
	if !here && mark != nil && j.valid && mark.Inst != "" && mark.Inst != j.inst {
		// A mark made under another instance key (this id for another
		// instance, or this command read under other defaults) indexes
		// the document that holds that command's decision and progress.
		od, err := w.instDoc(mark.Inst)
		if err != nil {
			return w.recall(j, nil, err)
		}
		oe := od.Cmds[j.sid]
		switch {
		case decidedIn(od, j.sid):
			if sameMsg {
				here = true
			} else {
				indexed = &cmdEntry{Phase: phaseDecided}
			}
		case sameMsg && entry == nil && oe != nil:
			// This command's progress, recorded under the other key: its
			// attempts and last answer, but not a call that went
			// unanswered, which was to that other instance and explains
			// no DLF.6205 of this one.
			c := *oe
			c.Unanswered = false
			entry = &c
		}
	}
	if here || (indexed != nil && indexed.Phase == phaseDecided) {
		if err := j.msg.Ack(); err != nil {
			j.log.Warn("ack of an already decided command failed", zap.Error(err))
		}
		w.m.skipped.Inc()
		if !here {
			// The contract makes the id final, so this instance is not
			// stopped and no outcome says so: only this line and the
			// metric show a publisher that reuses ids.
			w.m.reusedIDs.Inc()
			if !j.valid {
				j.log.Warn("command id already decided; this invalid command with it is acked without an outcome")
				return false
			}
			j.log.Warn("command id already decided for another instance; acked without a stop or an outcome")
			return false
		}
		j.log.Info("command already decided; acked without a call or a new outcome")
		return false
	}
	j.state = rec
	if entry != nil && entry.Phase == phasePending {
		// An earlier delivery decided but could not store the outcome:
		// store that same outcome now, without calling DLF again.
		if w.storePending(j, entry, "storing the outcome an earlier delivery decided") {
			return false
		}
	}
	// Progress of earlier deliveries. A delivery that handed the command
	// back wrote an entry; one whose "sent" mark is newer than that entry
	// died or lost its lease with a call perhaps on the wire, and nobody
	// saw the answer. (A mark of another message with the same id is not
	// this command's progress.)
	if entry != nil {
		j.attempts = entry.Attempts
		j.answeredBefore = entry.Attempts > 0
		j.out.HTTPStatus, j.out.ErrorCode = entry.LastHTTPStatus, entry.LastErrorCode
		j.out.ErrorMsg, j.out.DLFRequestID = entry.LastErrorMsg, entry.LastRequestID
		j.unanswered = entry.Unanswered
	}
	if mark != nil && j.markCounts(mark, recs[1].rev, entry) { // a mark: a valid command, whose id's key was read too
		// A call made, for attempts too (contract section 4: the
		// command's DLF calls), whose answer nobody saw: the last
		// attempt's status is 0 (found by review: attempts left it out,
		// and an expired redelivery said no call had been made).
		j.unanswered, j.markCounted = true, true
		j.attempts++
		j.out.HTTPStatus = 0
	}
	if j.valid && d.StoppedBy != "" {
		w.finish(j, StatusStopped, CauseAlreadyStopped,
			fmt.Sprintf("instance already stopped by command %s at %s", shownID(d.StoppedBy), d.StoppedAt))
		return false
	}
	return true
}

// setProgress is setCmd for a command handed back, unless the document
// already holds a decision for it that e would undo: two deliveries may
// overlap (the heartbeats of one lost in a consumer leader change), and
// the other one's decision is final; its pending outcome, too, stays
// unless e is a pending outcome itself.
func (d *stateDoc) setProgress(id string, e cmdEntry, keep time.Duration) (dropped map[string]cmdEntry) {
	cur := d.Cmds[id]
	switch {
	case d.StoppedBy == id:
		return nil
	case cur != nil && cur.Phase == phaseDecided:
		return nil
	case cur != nil && cur.Phase == phasePending && e.Phase != phasePending:
		return nil
	case cur != nil && cur.MarkRev != nil && (e.MarkRev == nil || *cur.MarkRev > *e.MarkRev):
		// Overlapping deliveries record their progress in any order. The
		// entry there accounts for marks this one never saw (an earlier
		// delivery, still alive, marked and called after this one read
		// the id's key): replaced, those marks would count as calls
		// nobody heard answered. Both stand, merged: the later mark
		// revision, any unanswered call, the larger count.
		e.MarkRev = cur.MarkRev
		e.Unanswered = e.Unanswered || cur.Unanswered
		e.Attempts = max(e.Attempts, cur.Attempts)
	}
	return d.setCmd(id, e, keep)
}

// markCounts says whether m, the id's key as read at revision rev, is the
// "sent" mark of another delivery of this command (this message, or
// another message with its id for its instance) whose call may have gone
// unanswered: not taken back (held), and not accounted for by e, the
// command's progress entry (nil: none). A mark made under another instance
// key (this command read under other defaults) is of a call to another
// instance: it explains no DLF.6205 of this one.
func (j *job) markCounts(m *cmdEntry, rev uint64, e *cmdEntry) bool {
	if m == nil || m.Phase != phaseSent || m.Held {
		return false
	}
	if m.Seq != j.meta.Sequence.Stream {
		// Another message with this id for this instance: the same
		// command published again (contract section 6), whose progress
		// entry this delivery adopts already, and whose call may have
		// stopped the instance. Delivery numbers of two messages do not
		// compare; the key's revision does.
		// An entry written by the mark's own delivery accounts for it
		// whatever the revision, as for this message's marks below: that
		// delivery knew whether it sent a call (found by review: a mark
		// stored whose answer was lost, with no call after it, counted).
		return m.Inst != "" && m.Inst == j.inst &&
			(e == nil || e.MarkRev == nil || (rev > *e.MarkRev && !(e.Seq != 0 && ownEntry(m, e))))
	}
	return m.Delivery != j.meta.NumDelivered && (m.Inst == "" || m.Inst == j.inst) && markUnaccounted(m, rev, e)
}

// markUnaccounted says whether the "sent" mark m, found at revision rev of
// the id's key, is of a call the command's progress entry e (nil: none)
// does not account for. An entry accounts for the marks up to the key's
// revision its delivery last read or wrote (MarkRev). Delivery numbers do
// not order them: deliveries overlap when one loses its lease, and an
// earlier delivery, still alive, may mark its call after a later one
// read the key, and that one record its progress after the mark. An
// entry of a version that did not record the revision is taken to
// account for the marks of its delivery and earlier ones, as before.
func markUnaccounted(m *cmdEntry, rev uint64, e *cmdEntry) bool {
	switch {
	case e == nil:
		return true
	case e.MarkRev != nil:
		// The entry of the mark's own delivery accounts for it whatever
		// the revision: a mark stored whose answer was lost (the sweeper
		// gave up, the delivery's time ran out) leaves the entry below
		// it, though that delivery knows it sent no call.
		return rev > *e.MarkRev && !ownEntry(m, e)
	default:
		return m.Delivery > e.Delivery
	}
}

// ownEntry says whether the progress entry e was written by the delivery
// that made mark m. Delivery numbers alone do not say it: the entry is
// shared by every message with the command's id, and delivery 1 of one
// message is not delivery 1 of another (found by review: another
// message's entry hid this one's call, and its DLF.6205 was
// dead-lettered). An entry that does not name its message (written by a
// version before it did) is matched by the number alone, as then.
func ownEntry(m, e *cmdEntry) bool {
	return m.Delivery == e.Delivery && (e.Seq == 0 || e.Seq == m.Seq)
}

// setDecided records the decision e of command id, written at e.At (Unix
// seconds, the real clock). A command that stopped the instance, when no
// other is recorded as having stopped it, becomes its stopped_by (at
// finishedAt) and needs no entry of its own; otherwise it gets the entry.
// It returns the entries prune dropped for room (see prune).
func (d *stateDoc) setDecided(id string, e cmdEntry, stopped bool, finishedAt string, keep time.Duration) map[string]cmdEntry {
	d.forgetOldStop(e.At, keep) // a re-read document may hold one again
	if stopped && d.StoppedBy == "" {
		d.StoppedBy, d.StoppedAt, d.StoppedT = id, finishedAt, e.At
		delete(d.Cmds, id)
		return d.prune(e.At, keep, "")
	}
	return d.setCmd(id, e, keep)
}

// collect adds the entries prune dropped to *all, allocating it only when
// there are some: on the common path there are none.
func collect(all *map[string]cmdEntry, dropped map[string]cmdEntry) {
	if len(dropped) == 0 {
		return
	}
	if *all == nil {
		*all = make(map[string]cmdEntry, len(dropped))
	}
	maps.Copy(*all, dropped)
}

// setCmd writes the entry of command id, written at e.At, and prunes the
// others (see prune) to at most keep old.
func (d *stateDoc) setCmd(id string, e cmdEntry, keep time.Duration) (dropped map[string]cmdEntry) {
	if d.Cmds == nil {
		d.Cmds = map[string]*cmdEntry{}
	}
	d.Cmds[id] = &e
	return d.prune(e.At, keep, id)
}
