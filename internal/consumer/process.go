package consumer

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/dlf"
)

// publishTimeout bounds the wait for one stored-ack. A publish that takes
// longer is treated as failed and the command is returned, never acked.
const publishTimeout = 10 * time.Second

// job is one delivery of one command on its way to an outcome.
type job struct {
	msg      jetstream.Msg
	meta     *jetstream.MsgMetadata
	cmd      command.Command
	out      Outcome
	attempts int
	log      *zap.Logger
}

// process takes one delivery to a decision (outcome stored, then ack) or
// hands it back to JetStream (nak) when it cannot decide now.
func (w *Worker) process(msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		// Not a JetStream delivery: cannot happen on a pull consumer, and
		// without metadata nothing can be decided safely. Return it.
		w.log.Error("message without JetStream metadata; returning it", zap.Error(err))
		_ = msg.NakWithDelay(w.cfg.RetryInitial)
		return
	}
	hdr := msg.Headers()
	cmd, verr := command.Decode(msg.Data(), command.Meta{
		MsgID:     hdr.Get(nats.MsgIdHdr),
		RedriveOf: hdr.Get(HeaderRedriveOf),
		Stream:    meta.Stream,
		Seq:       meta.Sequence.Stream,
	}, w.cfg.Defaults)
	j := &job{msg: msg, meta: meta, cmd: cmd}
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

	if verr != nil {
		w.finish(j, StatusRejected, CauseInvalidCommand, verr.Error())
		return
	}
	if !cmd.Deadline.IsZero() && !w.now().Before(cmd.Deadline) {
		w.finish(j, StatusExpired, CauseDeadlinePassed,
			fmt.Sprintf("deadline %s passed before the first call", cmd.Deadline.Format(time.RFC3339Nano)))
		return
	}

	req := dlf.StopRequest{ProjectID: cmd.ProjectID, Workspace: cmd.Workspace,
		ScriptName: cmd.ScriptName, InstanceID: cmd.InstanceID}
	sched := newSchedule(&w.cfg, meta.Timestamp, meta.NumDelivered)
	for {
		select {
		case <-w.stopping:
			w.giveBack(j, 0, "shutdown")
			return
		default:
		}
		v, ok := w.call(j, req)
		if !ok {
			w.giveBack(j, 0, "shutdown")
			return
		}
		switch v.Class {
		case dlf.ClassStopped:
			w.finish(j, StatusStopped, CauseOK, "")
			return
		case dlf.ClassFailed:
			w.finish(j, StatusFailed, CauseDLFError, "DLF refused the stop: "+describe(v))
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
		if !cmd.Deadline.IsZero() && !now.Add(wait).Before(cmd.Deadline) {
			w.finish(j, StatusExpired, CauseDeadlinePassed,
				fmt.Sprintf("deadline %s passes before the next attempt; last: %s",
					cmd.Deadline.Format(time.RFC3339Nano), describe(v)))
			return
		}
		if !w.waitInProcess(j, wait) {
			return
		}
	}
}

// waitInProcess sleeps before the next attempt when the wait is short and
// few commands are already sleeping; otherwise it hands the command back
// with NakWithDelay so it holds nothing here while it waits. It reports
// whether the caller should go on with the next attempt.
func (w *Worker) waitInProcess(j *job, wait time.Duration) bool {
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

// call makes one DLF attempt inside a concurrency slot and records what
// the answer says on the job. ok is false when shutdown cancelled the wait
// for a slot before any call was made.
func (w *Worker) call(j *job, req dlf.StopRequest) (v dlf.Verdict, ok bool) {
	select {
	case w.slots <- struct{}{}:
	case <-w.hard.Done():
		return v, false
	}
	w.m.inFlight.Inc()
	ctx, cancel := context.WithTimeout(w.hard, w.cfg.CallTimeout)
	start := time.Now()
	resp, err := w.dlf.Stop(ctx, req)
	elapsed := time.Since(start)
	cancel()
	w.m.inFlight.Dec()
	<-w.slots

	v = dlf.Classify(resp, err)
	j.attempts++
	w.m.observeCall(v.HTTPStatus, elapsed)
	j.out.HTTPStatus = v.HTTPStatus
	j.out.ErrorCode = v.ErrorCode
	j.out.ErrorMsg = v.ErrorMsg
	j.out.DLFRequestID = v.RequestID
	if v.Class != dlf.ClassStopped {
		j.log.Debug("DLF call did not stop the instance", zap.Int("attempt", j.attempts),
			zap.Int("http_status", v.HTTPStatus), zap.String("error_code", v.ErrorCode), zap.Error(err))
	}
	return v, true
}

// describe renders a verdict for the outcome's detail.
func describe(v dlf.Verdict) string {
	switch {
	case v.HTTPStatus == 0:
		if v.NotAnswered {
			return "no answer from DLF after the request was sent"
		}
		return "DLF could not be reached"
	case v.ErrorCode != "":
		return fmt.Sprintf("HTTP %d %s: %s", v.HTTPStatus, v.ErrorCode, v.ErrorMsg)
	default:
		return fmt.Sprintf("HTTP %d", v.HTTPStatus)
	}
}

// giveBack returns the command undecided. delay 0 means at once.
func (w *Worker) giveBack(j *job, delay time.Duration, reason string) {
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
		return
	}
	j.log.Debug("command returned to JetStream", zap.String("reason", reason), zap.Duration("delay", delay),
		zap.Int("attempt", j.attempts))
}

// finish stores the outcome (and the dead letter when the status is not
// stopped) and acks only after JetStream confirmed both.
func (w *Worker) finish(j *job, status, cause, detail string) {
	now := w.now()
	o := &j.out
	o.Status, o.Cause, o.Detail = status, cause, detail
	o.Attempts = j.attempts
	o.FinishedAt = FormatTime(now)
	o.DurationMS = now.Sub(j.meta.Timestamp).Milliseconds()

	ctx, cancel := context.WithTimeout(w.hard, publishTimeout)
	defer cancel()
	if _, err := w.pub.publishOutcome(ctx, o); err != nil {
		w.publishFailed(j, "outcome", err)
		return
	}
	// A duplicate outcome means an earlier delivery decided already and
	// lost its ack. The dead letter is still published (it deduplicates on
	// the same id): skipping it could lose the dead letter of a delivery
	// that stored its outcome but failed before dead-lettering.
	if status != StatusStopped {
		if err := w.pub.publishDead(ctx, o, j.msg.Data(), j.msg.Subject(), j.meta.Sequence.Stream); err != nil {
			w.publishFailed(j, "dead_letter", err)
			return
		}
	}
	if err := j.msg.Ack(); err != nil {
		// The outcome is stored; a redelivery repeats it under the same
		// Nats-Msg-Id, which the outcome stream drops as a duplicate.
		j.log.Warn("ack failed after the outcome was stored", zap.Error(err))
	}
	w.m.commands.WithLabelValues(status, cause).Inc()
	fields := []zap.Field{zap.String("status", status), zap.String("cause", cause),
		zap.Int("attempts", j.attempts), zap.Int("http_status", o.HTTPStatus)}
	if status == StatusStopped {
		j.log.Info("command decided", fields...)
		return
	}
	j.log.Info("command decided", append(fields, zap.String("error_code", o.ErrorCode),
		zap.String("detail", detail))...)
}

func (w *Worker) publishFailed(j *job, kind string, err error) {
	w.m.publishFail.WithLabelValues(kind).Inc()
	j.log.Warn("publish failed; returning the command undecided", zap.String("kind", kind), zap.Error(err))
	if w.hard.Err() != nil {
		w.giveBack(j, 0, "shutdown")
		return
	}
	w.giveBack(j, w.cfg.RetryInitial, "publish_failed")
}
