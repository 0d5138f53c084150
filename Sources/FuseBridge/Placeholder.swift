public enum FuseBridgePlaceholder {}
