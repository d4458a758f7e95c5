// Package logging builds the worker's zap logger from LOG_LEVEL and
// LOG_FORMAT. There is no global logger: the result is injected.
package logging

import (
	"fmt"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New returns a logger writing to stderr in "json" or "console" format.
func New(level, format string) (*zap.Logger, error) {
	cfg, err := newConfig(level, format)
	if err != nil {
		return nil, err
	}
	return cfg.Build()
}

func newConfig(level, format string) (zap.Config, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return zap.Config{}, fmt.Errorf("LOG_LEVEL: %w", err)
	}
	var cfg zap.Config
	switch format {
	case "json", "":
		cfg = zap.NewProductionConfig()
		cfg.EncoderConfig.TimeKey = "time"
		cfg.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	case "console":
		// The production settings in a console encoding: zap's
		// development ones add a stack trace to every warning and panic
		// on DPanic, and colour codes would land in files and log
		// collectors (found by review).
		cfg = zap.NewProductionConfig()
		cfg.Encoding = "console"
		cfg.EncoderConfig.TimeKey = "time"
		cfg.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
		cfg.EncoderConfig.EncodeLevel = zapcore.CapitalLevelEncoder
	default:
		return zap.Config{}, fmt.Errorf("LOG_FORMAT: must be json or console, got %q", format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	// Sampling would drop decisions an operator needs to audit.
	cfg.Sampling = nil
	return cfg, nil
}
