package embedded

import (
	"fmt"
	"sync"
)

// startLog is the embedded server's logger. It keeps what the server says
// went wrong, so Start can name the reason it did not start, and drops
// everything else, as NoLog did before.
//
// Its Fatalf records and returns. nats-server's Server.Fatalf only calls
// its logger's Fatalf; the exit comes from the server's own logger
// (log.Logger.Fatalf). Here the process must survive a server that could
// not start: worker dev reports it, a test fails with it.
type startLog struct {
	mu       sync.Mutex
	fatalMsg string // the first Fatalf
	lastErr  string // the latest Errorf
}

// Fatalf records the first fatal message; the server cannot go on after it.
func (l *startLog) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fatalMsg == "" {
		l.fatalMsg = msg
	}
}

// Errorf records the message, so a server that is still not ready when
// Start gives up can say what it last complained about.
func (l *startLog) Errorf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.mu.Lock()
	l.lastErr = msg
	l.mu.Unlock()
}

func (*startLog) Noticef(string, ...any) {}
func (*startLog) Warnf(string, ...any)   {}
func (*startLog) Debugf(string, ...any)  {}
func (*startLog) Tracef(string, ...any)  {}

// fatalMessage returns the first Fatalf message, or "" when there was none.
func (l *startLog) fatalMessage() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fatalMsg
}

// lastError returns the latest Errorf message, or "" when there was none.
func (l *startLog) lastError() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastErr
}
